"""The torch sampler: logprobs agree with the trainer, seeds, stops and truncation behave, and
continuous batching (mixed adapters, joining mid-flight, chunked prefill) changes no answer."""

from __future__ import annotations

import pytest
import torch

from tinker.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams
from tinker_backend.engine.model_engine import ModelEngine
from tinker_backend.model_registry import resolve_model

TEXT = "The quick brown fox jumps over the lazy dog."
PROMPT = [5, 17, 300, 42, 9]


def trainer_logprobs(engine: ModelEngine, adapter_id: str, tokens: list[int]) -> list[float]:
    """logprob of tokens[i] given tokens[:i], for i >= 1, from the training forward pass."""
    datum = Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)},
    )
    out = engine.forward_backward(adapter_id, [datum], "cross_entropy", None, backward=False)
    return out.loss_fn_outputs[0]["logprobs"].tolist()


def memo_tokens(engine: ModelEngine) -> list[int]:
    return [*engine.tokenizer.encode(TEXT), min(engine.eos_token_ids)]


def max_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def engine():
    engine = ModelEngine("tiny-llama", resolve_model("tiny-llama"))
    # "memo" has memorised TEXT followed by EOS; "noisy" is a few random steps away from the base.
    memo = memo_tokens(engine)
    memo_datum = Datum(
        model_input=ModelInput.from_ints(memo[:-1]),
        loss_fn_inputs={"target_tokens": memo[1:], "weights": [1.0] * (len(memo) - 1)},
    )
    generator = torch.Generator().manual_seed(0)
    noisy_data = []
    for _ in range(2):
        tokens = torch.randint(0, engine.vocab_size, (12,), generator=generator).tolist()
        noisy_data.append(
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 11},
            )
        )
    for name, data, steps, lr in (("memo", [memo_datum], 30, 5e-3), ("noisy", noisy_data, 3, 1e-2)):
        engine.create_adapter(name, LoraConfig(rank=8, seed=1))
        for _ in range(steps):
            engine.forward_backward(name, data, "cross_entropy", None, backward=True)
            engine.optim_step(name, AdamParams(learning_rate=lr))
        engine.snapshot_sampler(name, name)
    engine.create_adapter("base", LoraConfig(rank=4, seed=2))  # B = 0: the base model
    return engine


def test_sampled_logprobs_match_the_trainer(engine):
    params = SamplingParams(max_tokens=24, seed=0, stop=[])
    response = engine.sample("noisy", PROMPT, 3, params)
    for seq in response.sequences:
        assert seq.stop_reason == "length" and len(seq.tokens) == 24
        expected = trainer_logprobs(engine, "noisy", PROMPT + seq.tokens)[len(PROMPT) - 1 :]
        assert max_gap(seq.logprobs, expected) < 1e-4


def test_base_model_sampling(engine):
    response = engine.sample(None, PROMPT, 2, SamplingParams(max_tokens=10, seed=3, stop=[]))
    for seq in response.sequences:
        expected = trainer_logprobs(engine, "base", PROMPT + seq.tokens)[len(PROMPT) - 1 :]
        assert max_gap(seq.logprobs, expected) < 1e-4
    noisy = engine.sample("noisy", PROMPT, 2, SamplingParams(max_tokens=10, seed=3, stop=[]))
    assert noisy.sequences[0].logprobs != response.sequences[0].logprobs


def test_seed_reproduces_and_samples_differ(engine):
    params = SamplingParams(max_tokens=16, seed=11, stop=[])
    first = engine.sample("noisy", PROMPT, 4, params)
    second = engine.sample("noisy", PROMPT, 4, params)
    other = engine.sample("noisy", PROMPT, 4, SamplingParams(max_tokens=16, seed=12, stop=[]))
    assert [s.tokens for s in first.sequences] == [s.tokens for s in second.sequences]
    assert [s.tokens for s in first.sequences] != [s.tokens for s in other.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1


def test_greedy_equals_top_k_1_and_tiny_top_p(engine):
    greedy = engine.sample("noisy", PROMPT, 1, SamplingParams(max_tokens=12, temperature=0, stop=[]))
    top_k = engine.sample("noisy", PROMPT, 2, SamplingParams(max_tokens=12, top_k=1, seed=0, stop=[]))
    top_p = engine.sample("noisy", PROMPT, 2, SamplingParams(max_tokens=12, top_p=1e-6, seed=0, stop=[]))
    for seq in top_k.sequences + top_p.sequences:
        assert seq.tokens == greedy.sequences[0].tokens
        assert max_gap(seq.logprobs, greedy.sequences[0].logprobs) < 1e-5


def test_eos_stops_unless_stop_is_empty(engine):
    memo = memo_tokens(engine)
    prompt, rest = memo[:2], memo[2:]
    default = engine.sample("memo", prompt, 1, SamplingParams(max_tokens=40, temperature=0))
    assert default.sequences[0].tokens == rest and default.sequences[0].stop_reason == "stop"
    other_stop = engine.sample("memo", prompt, 1, SamplingParams(max_tokens=40, temperature=0, stop=["@@"]))
    assert other_stop.sequences[0].tokens == rest
    no_stop = engine.sample("memo", prompt, 1, SamplingParams(max_tokens=40, temperature=0, stop=[]))
    assert no_stop.sequences[0].stop_reason == "length" and len(no_stop.sequences[0].tokens) == 40
    assert no_stop.sequences[0].tokens[: len(rest)] == rest


def test_stop_strings_and_token_ids(engine):
    generated = engine.sample("noisy", PROMPT, 1, SamplingParams(max_tokens=20, temperature=0, stop=[]))
    tokens = generated.sequences[0].tokens
    decode = engine.tokenizer.decode

    # A stop string that spans a token boundary ends the sequence at the token completing it.
    for k in range(3, len(tokens)):
        before, after = decode(tokens[:k]), decode(tokens[: k + 1])
        if len(after) > len(before) >= 2 and after.startswith(before):
            stop = after[len(before) - 2 : len(before) + 1]
            if stop not in before and "\ufffd" not in stop:
                break
    else:
        pytest.fail("no token boundary to test with")
    by_string = engine.sample("noisy", PROMPT, 1, SamplingParams(max_tokens=20, temperature=0, stop=stop))
    assert by_string.sequences[0].tokens == tokens[: k + 1]
    assert by_string.sequences[0].stop_reason == "stop"

    stop_id = tokens[5]
    by_id = engine.sample("noisy", PROMPT, 1, SamplingParams(max_tokens=20, temperature=0, stop=[stop_id]))
    assert by_id.sequences[0].tokens == tokens[: tokens.index(stop_id) + 1]
    assert by_id.sequences[0].stop_reason == "stop"

    short = engine.sample("noisy", PROMPT, 1, SamplingParams(max_tokens=4, temperature=0, stop=[]))
    assert short.sequences[0].tokens == tokens[:4] and short.sequences[0].stop_reason == "length"


def test_prompt_logprobs_match_the_trainer(engine):
    tokens = PROMPT + memo_tokens(engine)
    expected = trainer_logprobs(engine, "noisy", tokens)
    computed = engine.compute_logprobs("noisy", tokens)
    assert computed[0] is None and max_gap(computed[1:], expected) < 1e-5
    assert engine.compute_logprobs("noisy", tokens[:1]) == [None]

    response = engine.sample(
        "noisy", tokens, 1, SamplingParams(max_tokens=1), include_prompt_logprobs=True, topk_prompt_logprobs=3
    )
    assert response.prompt_logprobs[0] is None and max_gap(response.prompt_logprobs[1:], expected) < 1e-5
    topk = response.topk_prompt_logprobs
    assert topk[0] is None and len(topk) == len(tokens)
    for pairs, actual in zip(topk[1:], expected, strict=True):
        values = [lp for _, lp in pairs]
        assert len(pairs) == 3 and values == sorted(values, reverse=True) and values[0] >= actual - 1e-6

    only_topk = engine.sample("noisy", tokens, 1, SamplingParams(max_tokens=1), topk_prompt_logprobs=2)
    assert only_topk.prompt_logprobs is None and len(only_topk.topk_prompt_logprobs[1]) == 2


def test_bad_requests_raise_clear_errors(engine):
    params = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="prompt"):
        engine.sample("noisy", [], 1, params)
    with pytest.raises(ValueError, match=r"prompt\[1\]"):
        engine.sample("noisy", [1, engine.vocab_size], 1, params)
    with pytest.raises(ValueError, match="max_context_length"):
        engine.sample("noisy", [1] * engine.max_context_length, 1, params)
    with pytest.raises(KeyError, match="sampler_id"):
        engine.sample("nope", PROMPT, 1, params)
    with pytest.raises(ValueError, match="num_samples"):
        engine.sample("noisy", PROMPT, 0, params)


# -- continuous batching --------------------------------------------------------------------

MIXED = [  # (sampler, prompt, num_samples, params, include_prompt_logprobs, topk_prompt_logprobs)
    ("noisy", PROMPT, 3, SamplingParams(max_tokens=20, seed=1, stop=[]), False, 0),
    ("memo", None, 1, SamplingParams(max_tokens=40, temperature=0), False, 0),  # prompt: memo[:2]
    (None, [7, 8, 9, 10, 11, 12, 13, 14, 15], 2, SamplingParams(max_tokens=12, seed=2, top_k=50, top_p=0.9, stop=[]), True, 2),
    ("noisy", [3, 4], 2, SamplingParams(max_tokens=16, seed=3, temperature=0.7, stop=[]), True, 0),
    ("memo", [99], 1, SamplingParams(max_tokens=6, seed=4, stop=[]), False, 3),
]


def mixed_requests(engine):
    memo = memo_tokens(engine)
    return [(s, memo[:2] if p is None else p, n, params, lp, k) for s, p, n, params, lp, k in MIXED]


def drain(engine, futures):
    while engine.sampler.step():
        pass
    return [f.result() for f in futures]


def assert_same(response, reference):
    assert [s.tokens for s in response.sequences] == [s.tokens for s in reference.sequences]
    assert [s.stop_reason for s in response.sequences] == [s.stop_reason for s in reference.sequences]
    for seq, ref in zip(response.sequences, reference.sequences, strict=True):
        assert max_gap(seq.logprobs, ref.logprobs) < 1e-5
    if reference.prompt_logprobs is not None:
        assert max_gap(response.prompt_logprobs[1:], reference.prompt_logprobs[1:]) < 1e-5
    assert (response.topk_prompt_logprobs is None) == (reference.topk_prompt_logprobs is None)


def test_mixed_batch_equals_each_request_alone(engine):
    """Requests of three adapters (and the base model), with different prompts, lengths and
    sampling settings, some joining while others decode: each gets what it gets alone, and
    its logprobs are the trainer's."""
    requests = mixed_requests(engine)
    alone = [engine.sample(*r) for r in requests]
    futures = [engine.submit_sample(*r) for r in requests[:3]]
    for _ in range(4):  # the first ones are decoding when the others join
        engine.sampler.step()
    futures += [engine.submit_sample(*r) for r in requests[3:]]
    for response, reference in zip(drain(engine, futures), alone, strict=True):
        assert_same(response, reference)
    trainer_ids = {"noisy": "noisy", "memo": "memo", None: "base"}
    for (sampler, prompt, *_), response in zip(requests, alone, strict=True):
        for seq in response.sequences:
            expected = trainer_logprobs(engine, trainer_ids[sampler], prompt + seq.tokens)[len(prompt) - 1 :]
            assert max_gap(seq.logprobs, expected) < 1e-4


def test_chunked_prefill_and_a_full_batch_change_nothing(engine):
    requests = mixed_requests(engine)
    alone = [engine.sample(*r) for r in requests]
    batcher = engine.sampler
    saved = batcher.prefill_chunk, batcher.max_rows
    batcher.prefill_chunk, batcher.max_rows = 3, 3  # prompts take several steps; requests wait for room
    try:
        futures = [engine.submit_sample(*r) for r in requests]
        for response, reference in zip(drain(engine, futures), alone, strict=True):
            assert_same(response, reference)
        with pytest.raises(ValueError, match="num_samples"):
            engine.submit_sample("noisy", PROMPT, 4, SamplingParams(max_tokens=2))
    finally:
        batcher.prefill_chunk, batcher.max_rows = saved


def test_a_removed_sampler_answers_what_was_queued(engine):
    engine.snapshot_sampler("noisy", "short-lived")
    params = SamplingParams(max_tokens=10, seed=5, stop=[])
    reference = engine.sample("short-lived", PROMPT, 2, params)
    future = engine.submit_sample("short-lived", PROMPT, 2, params)
    engine.sampler.step()
    engine.remove_sampler("short-lived")
    [response] = drain(engine, [future])
    assert_same(response, reference)
    assert not any("sample:short-lived" in layer.adapters for layer in engine.layers.values())
    with pytest.raises(KeyError, match="sampler_id"):
        engine.submit_sample("short-lived", PROMPT, 1, params)
