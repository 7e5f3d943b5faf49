"""End to end through the real client: embedded backend and a real ``tinker-server`` on loopback.

Each test runs against both backends (``backend_kind``), and one test checks that both give
identical numbers for the same program.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import tinker
from tinker import AdamParams, Datum, ModelInput, SamplingParams

TINY = "tiny-llama"

TEXT = "the quick brown fox jumps over the lazy dog"


def memorise_datum(tokenizer) -> tuple[Datum, list[int]]:
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    full = [bos, *tokens]
    datum = Datum(
        model_input=ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)},
    )
    return datum, full


def train(tc: tinker.TrainingClient, datum: Datum, steps: int, lr: float = 5e-3) -> list[float]:
    """Pipelined: every step's forward_backward and optim_step are submitted before awaiting."""
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward([datum], "cross_entropy")
        step = tc.optim_step(AdamParams(learning_rate=lr))
        losses.append(fb.result().metrics["loss:sum"])
        step.result()
    return losses


def test_memorise_sample_and_logprobs(make_service):
    service = make_service()
    tc = service.create_lora_training_client(TINY, rank=8, seed=0)
    datum, full = memorise_datum(tc.get_tokenizer())
    losses = train(tc, datum, steps=40)
    assert losses[-1] < 0.2 * losses[0], losses

    sampler = tc.save_weights_and_get_sampling_client()
    prompt = ModelInput.from_ints(full[:1])
    n_new = len(full) - 1
    out = sampler.sample(prompt, 1, SamplingParams(max_tokens=n_new, temperature=0.0, stop=[])).result()
    seq = out.sequences[0]
    assert seq.tokens == full[1:], tc.get_tokenizer().decode(seq.tokens)
    assert seq.stop_reason == "length"

    # The sampler's logprobs of its tokens equal the trainer's logprobs of the same tokens.
    trainer_lp = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    assert np.max(np.abs(np.asarray(seq.logprobs) - trainer_lp)) < 1e-4
    scored = sampler.compute_logprobs(ModelInput.from_ints(full)).result()
    assert scored[0] is None
    assert np.max(np.abs(np.asarray(scored[1:]) - trainer_lp)) < 1e-4


def test_save_load_round_trip(make_service):
    service = make_service()
    tc = service.create_lora_training_client(TINY, rank=4, seed=1)
    datum, _ = memorise_datum(tc.get_tokenizer())
    train(tc, datum, steps=3)
    saved = tc.save_state("after-3").result()
    assert saved.path == f"tinker://{tc.model_id}/weights/after-3"
    loss_before = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    next_loss = train(tc, datum, steps=2)[-1]

    resumed = service.create_training_client_from_state_with_optimizer(saved.path)
    assert resumed.forward([datum], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(loss_before, abs=1e-6)
    assert train(resumed, datum, steps=2)[-1] == pytest.approx(next_loss, abs=1e-5)

    # load_state on an existing run brings its weights back too.
    tc.load_state(saved.path).result()
    assert tc.forward([datum], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(loss_before, abs=1e-6)

    rest = service.create_rest_client()
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert [c.tinker_path for c in listed] == [saved.path]
    assert rest.get_weights_info_by_tinker_path(saved.path).result().lora_rank == 4


def test_named_sampler_equals_ephemeral(make_service):
    service = make_service()
    tc = service.create_lora_training_client(TINY, rank=8, seed=2)
    datum, full = memorise_datum(tc.get_tokenizer())
    train(tc, datum, steps=5)
    path = tc.save_weights_for_sampler("s5").result().path
    assert path.endswith("/sampler_weights/s5")
    named = service.create_sampling_client(model_path=path)
    ephemeral = tc.save_weights_and_get_sampling_client()
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=123)
    a = named.sample(ModelInput.from_ints(full[:3]), 2, params).result()
    b = ephemeral.sample(ModelInput.from_ints(full[:3]), 2, params).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]


def test_base_model_sampling_and_capabilities(make_service):
    service = make_service()
    names = [m.model_name for m in service.get_server_capabilities().result().supported_models]
    assert TINY in names
    sampler = service.create_sampling_client(base_model=TINY)
    out = sampler.sample(ModelInput.from_ints([1, 2, 3]), 3, SamplingParams(max_tokens=5, seed=7)).result()
    assert len(out.sequences) == 3
    assert all(1 <= len(s.tokens) <= 5 for s in out.sequences)


async def test_awaiting_never_blocks_the_callers_loop(make_service):
    service = make_service()
    tc = await service.create_lora_training_client(TINY, rank=4, seed=3)
    datum = Datum(
        model_input=ModelInput.from_ints(list(range(1, 60))),
        loss_fn_inputs={"target_tokens": list(range(2, 61)), "weights": [1.0] * 59},
    )
    pending: list = []
    ticks_while_pending = 0

    async def ticker() -> None:
        nonlocal ticks_while_pending
        while True:
            if any(not f.done() for f in pending):
                ticks_while_pending += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    for _ in range(5):
        pending[:] = [tc.forward_backward([datum], "cross_entropy"), tc.optim_step(AdamParams(learning_rate=1e-3))]
        for fut in pending:
            await fut
    task.cancel()
    assert ticks_while_pending > 0  # the caller's loop ran while the training steps were in flight


def test_bad_input_is_named_and_harmless(make_service):
    service = make_service()
    tc = service.create_lora_training_client(TINY, rank=4, seed=4)
    info = tc.get_info()  # the architecture read from the model's config.json
    assert (info.model_data.arch, info.model_data.model_name, info.lora_rank) == ("llama", TINY, 4)
    vocab = len(tc.get_tokenizer())
    good = Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]})
    # Caught on the client, before sending:
    with pytest.raises(ValueError, match=r"loss_fn_inputs\['weights'\]: expected the shape of target_tokens, \[2\], got \[1\]"):
        tc.forward_backward(
            [Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0]})],
            "cross_entropy",
        )
    with pytest.raises(ValueError, match="loss_fn: expected one of"):
        tc.forward_backward([good], "nope")
    with pytest.raises(ValueError, match=r"loss_fn_inputs\[.logprobs.\]: expected a tensor \(required by .ppo.\)"):
        tc.forward_backward([good], "ppo")
    # Caught by the server, which names the field:
    too_big = Datum(model_input=ModelInput.from_ints([1, vocab + 5]), loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]})
    with pytest.raises(tinker.BadRequestError, match=rf"data\[0\]\.model_input: expected token ids in \[0, {vocab}\), got {vocab + 5}"):
        tc.forward_backward([too_big], "cross_entropy").result()
    with pytest.raises(tinker.NotFoundError, match="unknown checkpoint"):
        tc.load_state(f"tinker://{tc.model_id}/weights/missing").result()
    with pytest.raises(tinker.NotFoundError, match="base_model"):
        service.create_lora_training_client("no-such-model/anywhere").result()
    # The run still works after all that.
    assert tc.forward_backward([good], "cross_entropy").result().metrics["loss:sum"] > 0


def test_embedded_and_server_give_identical_results(server, embedded_dir):
    def program(service: tinker.ServiceClient) -> tuple[list[float], list[int]]:
        tc = service.create_lora_training_client(TINY, rank=8, seed=42)
        datum, full = memorise_datum(tc.get_tokenizer())
        losses = train(tc, datum, steps=4)
        sampler = tc.save_weights_and_get_sampling_client()
        tokens = sampler.sample(ModelInput.from_ints(full[:2]), 1, SamplingParams(max_tokens=8, seed=9)).result()
        return losses, tokens.sequences[0].tokens

    embedded = program(tinker.ServiceClient(data_dir=embedded_dir))
    remote = program(tinker.ServiceClient(base_url=server.base_url))
    assert embedded == remote


def test_forward_backward_custom_matches_the_builtin_loss(make_service):
    """A custom loss equal to cross_entropy must train exactly like cross_entropy."""
    service = make_service()
    builtin = service.create_lora_training_client(TINY, rank=4, seed=5)
    custom = service.create_lora_training_client(TINY, rank=4, seed=5)
    datum, _ = memorise_datum(builtin.get_tokenizer())

    def nll(data, logprobs):
        loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs, strict=True))
        return loss, {"tokens:sum": float(sum(lp.numel() for lp in logprobs))}

    for _ in range(3):
        expected = builtin.forward_backward([datum], "cross_entropy")
        builtin.optim_step(AdamParams(learning_rate=1e-2))
        got = custom.forward_backward_custom([datum], nll)
        custom.optim_step(AdamParams(learning_rate=1e-2))
        assert got.result().metrics["loss:sum"] == pytest.approx(expected.result().metrics["loss:sum"], rel=1e-5)
        assert got.result().metrics["tokens:sum"] == datum.model_input.length
    after_builtin = builtin.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    after_custom = custom.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert after_custom == pytest.approx(after_builtin, rel=1e-4)
