"""Every primitive of the official SDK (0.38.0), unchanged, against ``tinker-server``."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import tinker
from tinker import types

from .conftest import TINY

TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture
def service() -> Iterator[tinker.ServiceClient]:
    with tinker.ServiceClient() as service:  # base URL and API key come from the environment
        yield service


def text_datum(tokenizer, text: str = TEXT) -> tuple[types.Datum, list[int]]:
    full = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)},
    )
    return datum, full


def train(tc: tinker.TrainingClient, datum: types.Datum, steps: int, lr: float = 1e-2) -> list[float]:
    """Pipelined: every step's forward_backward and optim_step are submitted before any is awaited."""
    pairs = [
        (tc.forward_backward([datum], "cross_entropy"), tc.optim_step(types.AdamParams(learning_rate=lr)))
        for _ in range(steps)
    ]
    losses = [fb.result().metrics["loss:sum"] for fb, _ in pairs]
    for _, step in pairs:
        step.result()
    return losses


def loss_of(tc: tinker.TrainingClient, datum: types.Datum) -> float:
    return tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]


@pytest.mark.slow
@pytest.mark.timeout(120)  # 32 s measured (loaded)
def test_pipelined_training_learns_and_get_tokenizer_works_offline(service: tinker.ServiceClient) -> None:
    tc = service.create_lora_training_client(TINY, rank=8, seed=0).result()
    info = tc.get_info()
    assert (info.model_id, info.model_data.model_name, info.lora_rank) == (tc.model_id, TINY, 8)
    assert tc.model_id.endswith(":train:0")
    datum, _ = text_datum(tc.get_tokenizer())  # a local folder: no Hub access needed
    losses = train(tc, datum, steps=12)
    assert losses[-1] < 0.5 * losses[0], losses

    out = tc.forward([datum], "cross_entropy").result()
    logprobs = out.loss_fn_outputs[0]["logprobs"]
    assert logprobs.shape == [datum.model_input.length]
    assert -sum(logprobs.tolist()) == pytest.approx(out.metrics["loss:sum"], rel=1e-5)
    assert out.metrics["loss:sum"] < losses[-1]
    assert all(key.count(":") == 1 for key in out.metrics), out.metrics


def test_each_loss_with_its_loss_fn_config(service: tinker.ServiceClient) -> None:
    tc = service.create_lora_training_client(TINY, rank=4, seed=1).result()
    datum, _ = text_datum(tc.get_tokenizer())
    n = datum.model_input.length
    logp = np.array(tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist())

    def rl_datum(shift: float, advantage: float) -> types.Datum:
        """Sampler logprobs q = logp + shift, so every token's ratio p / q is exp(-shift)."""
        return types.Datum(
            model_input=datum.model_input,
            loss_fn_inputs={
                "target_tokens": datum.loss_fn_inputs["target_tokens"],
                "logprobs": (logp + shift).astype(np.float32),
                "advantages": np.full(n, advantage, dtype=np.float32),
            },
        )

    def loss(loss_fn: str, d: types.Datum, config: dict[str, float] | None = None) -> float:
        return tc.forward_backward([d], loss_fn, config).result().metrics["loss:sum"]

    r = np.exp(-1.0)
    assert loss("cross_entropy", datum) == pytest.approx(-logp.sum(), rel=1e-4)
    assert loss("importance_sampling", rl_datum(1.0, 1.0)) == pytest.approx(-n * r, rel=1e-4)
    # ppo with A = -1: each token costs max(r, clip(r, low, high)), so clip_low decides.
    assert loss("ppo", rl_datum(1.0, -1.0)) == pytest.approx(n * 0.8, rel=1e-4)
    assert loss("ppo", rl_datum(1.0, -1.0), {"clip_low_threshold": 0.1}) == pytest.approx(n * r, rel=1e-4)
    # cispo: -clip(r) * logp * A with r = e^2, capped by clip_high (4 by default).
    assert loss("cispo", rl_datum(-2.0, 1.0)) == pytest.approx(-4.0 * logp.sum(), rel=1e-4)
    config = {"clip_high_threshold": 10.0}
    assert loss("cispo", rl_datum(-2.0, 1.0), config) == pytest.approx(-np.exp(2.0) * logp.sum(), rel=1e-4)
    # dro: -(logp * A - beta / 2 * (logp - q)^2), here with (logp - q)^2 = 1.
    assert loss("dro", rl_datum(1.0, 1.0), {"beta": 0.5}) == pytest.approx(-(logp.sum() - 0.25 * n), rel=1e-4)
    # gspo with A = -1: each token costs max(s, clip(s)) with the sequence ratio s = r.
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}
    assert loss("gspo", rl_datum(1.0, -1.0), config) == pytest.approx(n * 0.5, rel=1e-4)


def test_a_forward_backward_big_enough_to_be_chunked(service: tinker.ServiceClient) -> None:
    """10 datums, at most 4 per request on this server: the SDK sends 3 requests (the first
    one last) and merges their answers, which go through "complete_metadata" (over 1 KiB)."""
    tc = service.create_lora_training_client(TINY, rank=4, seed=2).result()
    rng = np.random.default_rng(0)
    data = []
    for length in range(70, 120, 5):
        tokens = rng.integers(1, 2000, size=length + 1)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": np.ones(length, dtype=np.float32)},
            )
        )
    whole = tc.forward_backward(data, "cross_entropy").result()
    alone = [tc.forward([d], "cross_entropy").result() for d in data]
    assert [o["logprobs"].shape for o in whole.loss_fn_outputs] == [[d.model_input.length] for d in data]
    for merged, single in zip(whole.loss_fn_outputs, alone, strict=True):
        np.testing.assert_allclose(
            merged["logprobs"].tolist(), single.loss_fn_outputs[0]["logprobs"].tolist(), atol=1e-4
        )
    assert whole.metrics["loss:sum"] == pytest.approx(sum(a.metrics["loss:sum"] for a in alone), rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(90)  # 29 s measured (loaded)
def test_forward_backward_custom_learns(service: tinker.ServiceClient) -> None:
    tc = service.create_lora_training_client(TINY, rank=4, seed=3).result()
    datum, _ = text_datum(tc.get_tokenizer())

    def mean_nll(data: list[types.Datum], logprobs: list) -> tuple:
        loss = sum(-lp.mean() for lp in logprobs)
        return loss, {"mean_nll": float(loss.detach())}

    initial = loss_of(tc, datum) / datum.model_input.length
    losses = []
    for _ in range(8):
        out = tc.forward_backward_custom([datum], mean_nll)
        step = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        result = out.result()
        step.result()
        losses.append(result.metrics["loss:sum"])
        assert result.metrics["mean_nll"] == pytest.approx(result.metrics["loss:sum"])
        assert "surrogate_loss:sum" in result.metrics
    assert losses[0] == pytest.approx(initial, rel=1e-4)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
@pytest.mark.timeout(150)  # 46 s measured (loaded)
def test_ephemeral_named_and_base_model_samplers(service: tinker.ServiceClient) -> None:
    tc = service.create_lora_training_client(TINY, rank=8, seed=4).result()
    datum, full = text_datum(tc.get_tokenizer())
    losses = train(tc, datum, steps=10)
    assert losses[-1] < 0.7 * losses[0], losses
    ephemeral = tc.save_weights_and_get_sampling_client().result()
    saved = tc.save_weights_for_sampler("memorised").result()
    assert saved.path == f"tinker://{tc.model_id}/sampler_weights/memorised"
    named = service.create_sampling_client(model_path=saved.path).result()
    base = service.create_sampling_client(base_model=TINY).result()
    assert named.get_base_model() == TINY

    prompt = types.ModelInput.from_ints(full[:2])
    greedy = types.SamplingParams(max_tokens=len(full) - 2, temperature=0.0, stop=[])
    outs = [client.sample(prompt, 2, greedy).result() for client in (ephemeral, named, base)]
    trained = outs[0].sequences[0].tokens
    assert trained == outs[1].sequences[0].tokens  # the same weights, saved two ways
    assert trained != outs[2].sequences[0].tokens  # not the base model's
    for out in outs:
        assert len(out.sequences) == 2
        for sequence in out.sequences:
            assert sequence.stop_reason == "length"
            assert len(sequence.logprobs) == len(sequence.tokens)
    ids = [sequence.sequence_id for out in outs for sequence in out.sequences]
    assert len(set(ids)) == len(ids) and all(ids)

    sampled = ephemeral.sample(
        prompt, 3, types.SamplingParams(max_tokens=4, seed=5, temperature=1.0)
    ).result()
    assert len(sampled.sequences) == 3 and all(1 <= len(s.tokens) <= 4 for s in sampled.sequences)


def test_compute_logprobs_and_prompt_logprobs(service: tinker.ServiceClient) -> None:
    tc = service.create_lora_training_client(TINY, rank=4, seed=5).result()
    datum, full = text_datum(tc.get_tokenizer())
    train(tc, datum, steps=2)
    sampler = tc.save_weights_and_get_sampling_client().result()
    trainer = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()

    scored = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
    assert scored[0] is None
    np.testing.assert_allclose(scored[1:], trainer, atol=1e-4)

    last = sampler.sample(
        types.ModelInput.from_ints(full),
        1,
        types.SamplingParams(max_tokens=1),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
        prompt_logprobs_last_n=3,
    ).result()
    assert last.prompt_logprobs[:-3] == [None] * (len(full) - 3)
    np.testing.assert_allclose(last.prompt_logprobs[-3:], trainer[-3:], atol=1e-4)
    assert last.topk_prompt_logprobs[:-3] == [None] * (len(full) - 3)
    for row in last.topk_prompt_logprobs[-3:]:
        assert len(row) == 3 and row[0][1] >= row[1][1] >= row[2][1]


def test_rest_client(service: tinker.ServiceClient) -> None:
    tc = service.create_lora_training_client(TINY, rank=4, seed=6).result()
    session_id = tc.model_id.split(":train:")[0]
    state = tc.save_state("rest-state").result().path
    sampler_path = tc.save_weights_for_sampler("rest-sampler").result().path
    sampler = service.create_sampling_client(model_path=sampler_path).result()
    rest = tinker.RestClient()

    models = rest.get_server_capabilities().result().supported_models
    assert TINY in [m.model_name for m in models]
    runs = rest.list_training_runs(limit=100).result()
    assert tc.model_id in [run.training_run_id for run in runs.training_runs]
    assert runs.cursor.total_count >= len(runs.training_runs)
    run = rest.get_training_run(tc.model_id).result()
    assert (run.base_model, run.lora_rank, run.is_lora) == (TINY, 4, True)
    assert run.last_checkpoint.tinker_path == state
    assert run.last_sampler_checkpoint.tinker_path == sampler_path

    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert {(c.checkpoint_id, c.checkpoint_type) for c in listed} == {
        ("weights/rest-state", "training"),
        ("sampler_weights/rest-sampler", "sampler"),
    }
    user_paths = [c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints]
    assert {state, sampler_path} <= set(user_paths)
    info = rest.get_weights_info_by_tinker_path(state).result()
    assert (info.base_model, info.lora_rank, info.is_lora) == (TINY, 4, True)

    rest.set_checkpoint_ttl_from_tinker_path(state, 7200).result()
    (with_ttl,) = [
        c for c in rest.list_checkpoints(tc.model_id).result().checkpoints if c.tinker_path == state
    ]
    assert with_ttl.expires_at is not None
    rest.delete_checkpoint_from_tinker_path(sampler_path).result()
    assert [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [state]

    assert session_id in rest.list_sessions(limit=100).result().sessions
    session = rest.get_session(session_id).result()
    assert session.training_run_ids == [tc.model_id]
    assert session.sampler_ids == [f"{session_id}:sample:0"]
    assert rest.get_sampler(f"{session_id}:sample:0").result().model_path == sampler_path
    assert sampler.get_base_model() == TINY


@pytest.mark.slow
@pytest.mark.timeout(180)  # 57 s measured (loaded)
def test_training_clients_from_state_with_and_without_optimizer(service: tinker.ServiceClient) -> None:
    tc = service.create_lora_training_client(TINY, rank=4, seed=7).result()
    datum, _ = text_datum(tc.get_tokenizer())
    train(tc, datum, steps=3)
    path = tc.save_state("three-steps").result().path
    at_save = loss_of(tc, datum)
    train(tc, datum, steps=2)
    continued = loss_of(tc, datum)

    with_optimizer = service.create_training_client_from_state_with_optimizer(path).result()
    assert loss_of(with_optimizer, datum) == pytest.approx(at_save, rel=1e-5)
    train(with_optimizer, datum, steps=2)
    assert loss_of(with_optimizer, datum) == pytest.approx(continued, rel=1e-4)

    weights_only = service.create_training_client_from_state(path).result()
    assert weights_only.get_info().lora_rank == 4
    assert loss_of(weights_only, datum) == pytest.approx(at_save, rel=1e-5)
    train(weights_only, datum, steps=2)  # a fresh AdamW takes different steps
    assert loss_of(weights_only, datum) != pytest.approx(continued, rel=1e-3)

    with pytest.warns(FutureWarning):
        loaded = tc.load_state(path)  # deprecated in 0.38, still served
    loaded.result()
    assert loss_of(tc, datum) == pytest.approx(at_save, rel=1e-5)


def test_bad_input_is_refused_naming_the_field(service: tinker.ServiceClient) -> None:
    tc = service.create_lora_training_client(TINY, rank=4, seed=8).result()
    datum, _ = text_datum(tc.get_tokenizer())
    vocab = len(tc.get_tokenizer())
    out_of_vocab = types.Datum(
        model_input=types.ModelInput.from_ints([1, vocab + 5]),
        loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]},
    )
    with pytest.raises(
        tinker.RequestFailedError, match=r"data\[0\]\.model_input: expected token ids"
    ) as failed:
        tc.forward_backward([out_of_vocab], "cross_entropy").result()
    assert failed.value.category == types.RequestErrorCategory.User
    with pytest.raises(tinker.RequestFailedError, match=r"loss_fn_inputs\['logprobs'\]: expected a tensor \(required by 'ppo'\)"):
        tc.forward_backward([datum], "ppo").result()

    image = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=2)]
        ),
        loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]},
    )
    with pytest.raises(
        tinker.BadRequestError, match=r"data\[0\]\.model_input\.chunks\[0\]: expected an encoded_text"
    ):
        tc.forward_backward([image], "cross_entropy").result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt, params = types.ModelInput.from_ints([1, 2]), types.SamplingParams(max_tokens=2)
    with pytest.raises(tinker.BadRequestError, match="prompt_alt_tokens_k: not supported"):
        sampler.sample(prompt, 1, params, prompt_alt_tokens_k=2).result()
    with pytest.raises(tinker.RequestFailedError, match="unknown checkpoint"):
        service.create_training_client_from_state(f"tinker://{tc.model_id}/weights/missing").result()

    assert train(tc, datum, steps=1)[0] > 0  # the run goes on


def test_stable_reinforce_with_provenance_through_the_sdk(service: tinker.ServiceClient) -> None:
    """Recorded sampling and provenance spans over the HTTP protocol (protobuf spans); on the
    sampler's own weights r = 1, so the loss is -sum(A) over the sampled tokens."""
    tc = service.create_lora_training_client(TINY, rank=4, seed=11).result()
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    prompt = [1, 17, 42, 99]
    params = types.SamplingParams(max_tokens=5, seed=3, stop=[])
    sequence = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]

    def datum(sampled: list[int]) -> types.Datum:
        n = len(prompt) - 1
        plain = types.Datum(
            model_input=types.ModelInput.from_ints(prompt + sampled[:-1]),
            loss_fn_inputs={
                "target_tokens": [0] * n + sampled,
                "logprobs": [0.0] * (n + len(sampled)),
                "advantages": [0.0] * n + [2.0] * len(sampled),
            },
        )
        sid = sequence.sequence_id
        return plain.with_provenance(
            model_input=[
                types.PromptProvenanceSpan(sequence_id=sid, length=len(prompt)),
                types.SampledProvenanceSpan(sequence_id=sid, length=len(sampled) - 1),
            ],
            loss_fn_inputs=[
                types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=n),
                types.SampledProvenanceSpan(sequence_id=sid, length=len(sampled)),
            ],
        )

    out = tc.forward([datum(sequence.tokens)], "stable_reinforce").result()
    assert out.metrics["loss:sum"] == pytest.approx(-2.0 * len(sequence.tokens), rel=1e-4)
    wrong = [*sequence.tokens[:-1], (sequence.tokens[-1] + 1) % 50]
    with pytest.raises(
        tinker.RequestFailedError,
        match=r"data\[0\]\.loss_fn_input_spans\[1\]: expected the datum's tokens to equal the sampled tokens",
    ):
        tc.forward_backward([datum(wrong)], "stable_reinforce").result()
