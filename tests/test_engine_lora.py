"""Multi-LoRA layers and routing: the merged batch equals separate runs, and the math equals peft's.

The central test is ``test_merged_batch_equals_separate_runs``: several adapters with different
ranks, seeds, target sets and sequence lengths share one forward/backward pass, and each gets
exactly the loss, logprobs and gradients it gets alone. ``test_peft_round_trip`` checks the LoRA
math against an independent implementation (peft) through the saved PEFT files.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tinker.types import AdamParams, Datum, LoraConfig, ModelInput
from tinker_backend.engine.lora import (
    LoraLinear,
    LoraRouting,
    LoraWeights,
    Segment,
    cheapest_groups,
    rank_bucket,
)
from tinker_backend.engine.model_engine import FwdBwdItem, ModelEngine
from tinker_backend.model_registry import resolve_model


def make_datum(generator: torch.Generator, vocab: int, n: int, k: int = 0) -> Datum:
    tokens = torch.randint(0, vocab, (n,), generator=generator)
    shape = (n, k) if k else (n,)
    targets = torch.randint(0, vocab, shape, generator=generator)
    weights = torch.rand(shape, generator=generator)
    return Datum(
        model_input=ModelInput.from_ints(tokens.tolist()),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )


def grads(engine: ModelEngine, adapter_id: str) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in engine._adapter(adapter_id).parameters()]


def clear_grads(engine: ModelEngine, adapter_id: str) -> None:
    for p in engine._adapter(adapter_id).parameters():
        p.grad = None


def train_a_little(engine: ModelEngine, adapter_id: str, steps: int = 2, seed: int = 0) -> None:
    """A few steps on random data, so that B is no longer zero."""
    generator = torch.Generator().manual_seed(seed)
    data = [make_datum(generator, engine.vocab_size, 12) for _ in range(2)]
    for _ in range(steps):
        engine.forward_backward(adapter_id, data, "cross_entropy", None, backward=True)
        engine.optim_step(adapter_id, AdamParams(learning_rate=1e-2))


@pytest.fixture(scope="module")
def model_path():
    return resolve_model("tiny-llama")


@pytest.fixture(scope="module")
def engine(model_path):
    return ModelEngine("tiny-llama", model_path)


@pytest.fixture(scope="module")
def tied_path(model_path, tmp_path_factory):
    """The tiny model with tied input/output embeddings (as SmolLM2 has)."""
    out = tmp_path_factory.mktemp("tiny-tied")
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.config.tie_word_embeddings = True
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_path / name, out / name)
    return out


def test_lora_linear_matches_reference_loop():
    """The segment implementation equals the docstring's per-row loop, values and gradients."""
    torch.manual_seed(0)
    routing = LoraRouting()
    layer = LoraLinear(torch.nn.Linear(6, 5), routing, "mlp")
    for name, rank in (("x", 2), ("y", 3)):
        A = torch.randn(rank, 6, requires_grad=True)
        B = torch.randn(5, rank, requires_grad=True)
        layer.adapters[name] = LoraWeights(A, B, 32 / rank)
    routing.set([("x", 0, 2), (None, 2, 3), ("y", 3, 5), ("missing", 5, 6)])
    x = torch.randn(6, 4, 6)
    probe = torch.randn(6, 4, 5)

    (layer(x) * probe).sum().backward()
    got = {name: (w.A.grad.clone(), w.B.grad.clone()) for name, w in layer.adapters.items()}
    got_y = layer(x).detach()
    for w in layer.adapters.values():
        w.A.grad = w.B.grad = None

    y = layer.base(x).clone()
    for seg in routing.segments:
        w = layer.adapters.get(seg.adapter)
        if w is not None:
            for row in range(seg.start, seg.stop):
                y[row] += x[row] @ w.A.T @ w.B.T * w.scaling
    (y * probe).sum().backward()
    torch.testing.assert_close(got_y, y.detach())
    for name, w in layer.adapters.items():
        torch.testing.assert_close(got[name], (w.A.grad, w.B.grad))


@pytest.mark.parametrize(
    "segments",
    [
        # mixed ranks, a None segment, a missing adapter, a no-grad segment, unequal lengths
        [("r2", 0, 3), (None, 3, 4), ("r5", 4, 5), ("missing", 5, 7), ("r2", 7, 9, False), ("r3", 9, 16)],
        [("r2", 0, 2), ("r5", 2, 4), ("r3", 4, 6)],  # equal blocks covering every row: no gather
        [("r3", 0, 1), ("r5", 1, 2, False), (None, 2, 3)],  # decode-like: one row per segment
    ],
)
def test_batched_delta_equals_loop(segments):
    """The batched multi-segment path equals the per-segment loop, values and every gradient."""
    torch.manual_seed(0)
    routing = LoraRouting()
    layer = LoraLinear(torch.nn.Linear(6, 5), routing, "mlp")
    for name, rank in (("r2", 2), ("r5", 5), ("r3", 3)):
        A = torch.randn(rank, 6, requires_grad=True)
        B = torch.randn(5, rank, requires_grad=True)
        layer.adapters[name] = LoraWeights(A, B, 32 / rank)
    routing.set(segments)
    x = torch.randn(routing.num_rows, 4, 6, requires_grad=True)
    probe = torch.randn(routing.num_rows, 4, 5)

    results = []
    for delta in (layer.forward, lambda x: layer._looped(x, layer.base(x))):
        y = delta(x)
        (y * probe).sum().backward()
        grads = {name: (w.A.grad, w.B.grad) for name, w in layer.adapters.items()}
        results.append((y.detach(), x.grad, grads))
        x.grad = None
        for w in layer.adapters.values():
            w.A.grad = w.B.grad = None
    (batched, batched_dx, batched_grads), (looped, looped_dx, looped_grads) = results
    torch.testing.assert_close(batched, looped)
    torch.testing.assert_close(batched_dx, looped_dx)
    for name, expected in looped_grads.items():
        if expected[0] is None:  # only used without gradient: the batched path leaves none either
            assert batched_grads[name] == (None, None)
        else:
            torch.testing.assert_close(batched_grads[name], expected)


def test_detached_segment_leaves_no_gradient():
    routing = LoraRouting()
    layer = LoraLinear(torch.nn.Linear(3, 3), routing, "attn")
    w = LoraWeights(torch.randn(2, 3, requires_grad=True), torch.randn(3, 2, requires_grad=True), 16.0)
    layer.adapters["x"] = w
    routing.set([Segment("x", 0, 2, requires_grad=False)])
    layer(torch.randn(2, 3)).sum().backward()
    assert w.A.grad is None and w.B.grad is None


def test_routing_rejects_gaps():
    with pytest.raises(ValueError, match="contiguous"):
        LoraRouting().set([("x", 0, 2), ("y", 3, 4)])


def test_attached_layers_and_kinds(engine):
    kinds = {path: layer.kind for path, layer in engine.layers.items()}
    assert kinds["lm_head"] == "unembed"
    assert kinds["model.layers.0.self_attn.q_proj"] == "attn"
    assert kinds["model.layers.1.mlp.down_proj"] == "mlp"
    assert len(kinds) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    assert not any(p.requires_grad for p in engine.model.parameters())


def test_merged_batch_equals_separate_runs(engine):
    configs = {
        "alpha": LoraConfig(rank=4, seed=1),
        "beta": LoraConfig(rank=8, seed=2, train_attn=False),
        "gamma": LoraConfig(rank=16, seed=3, train_mlp=False, train_unembed=False),
        "delta": LoraConfig(rank=2, seed=4),
    }
    for i, (name, config) in enumerate(configs.items()):
        engine.create_adapter(name, config)
        train_a_little(engine, name, seed=i)
    generator = torch.Generator().manual_seed(42)
    vocab = engine.vocab_size
    items = [
        FwdBwdItem("gamma", [make_datum(generator, vocab, 20, k=3)], "cross_entropy", None, True),
        FwdBwdItem("alpha", [make_datum(generator, vocab, n) for n in (5, 17)], "cross_entropy", None, True),
        FwdBwdItem("delta", [make_datum(generator, vocab, 11)], "cross_entropy", None, False),
        FwdBwdItem(
            "beta", [make_datum(generator, vocab, n) for n in (9, 12, 3)], "cross_entropy", None, True
        ),
        FwdBwdItem("alpha", [make_datum(generator, vocab, 7)], "cross_entropy", None, False),
    ]

    alone = []
    for item in items:
        alone.append((engine.forward_backward(*item), grads(engine, item.adapter_id)))
        clear_grads(engine, item.adapter_id)
    merged = engine.forward_backward_many(items)
    try:
        for item, (expected, expected_grads), got in zip(items, alone, merged, strict=True):
            assert got.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-5)
            for out_got, out_expected in zip(got.loss_fn_outputs, expected.loss_fn_outputs, strict=True):
                lp = out_got["logprobs"].to_torch()
                assert list(lp.shape) == out_expected["logprobs"].shape
                torch.testing.assert_close(lp, out_expected["logprobs"].to_torch(), rtol=1e-5, atol=1e-6)
            if item.backward:
                for g, e in zip(grads(engine, item.adapter_id), expected_grads, strict=True):
                    # fp32 rounding of an entry scales with the whole tensor (a sum), not the entry
                    torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))
        assert all(g is None for g in grads(engine, "delta"))  # forward-only: no gradient at all
    finally:
        for name in configs:
            engine.remove_adapter(name)


def test_rank_buckets_are_powers_of_two():
    assert [rank_bucket(r) for r in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64)] == [
        1, 2, 4, 4, 8, 8, 16, 16, 32, 32, 64, 64
    ]


@pytest.mark.parametrize(
    ("group_cost_flops", "second_bmm_ranks"),
    [
        (0.0, [4, 8, 16, 32]),  # every bucket its own group: nothing padded to 32 but rank 32
        (math.inf, [32]),  # one group: everyone padded to the largest rank
        (None, [32]),  # the CPU default at these tiny sizes: padding is cheaper than more ops
    ],
)
def test_rank_groups_give_the_per_segment_loop_values_and_gradients(group_cost_flops, second_bmm_ranks):
    """Ranks 4/8/16/32 (interleaved, uneven rows, a no-grad segment) in one batch, with the
    buckets in their own groups or in one: one bmm shape per group, and values and gradients
    equal the per-segment loop."""
    torch.manual_seed(0)
    routing = LoraRouting(group_cost_flops)
    layer = LoraLinear(torch.nn.Linear(16, 12), routing, "mlp")
    for rank in (4, 8, 16, 32, 3):
        layer.adapters[f"r{rank}"] = LoraWeights(
            torch.randn(rank, 16, requires_grad=True), torch.randn(12, rank, requires_grad=True), 32 / rank
        )
    routing.set([("r32", 0, 2), ("r4", 2, 4), ("r16", 4, 7), ("r8", 7, 9), ("r3", 9, 10), ("r4", 10, 12, False)])
    seen = []
    bmm = torch.bmm

    def recording_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(b.shape))
        return bmm(a, b)

    x = torch.randn(routing.num_rows, 5, 16, requires_grad=True)
    probe = torch.randn(routing.num_rows, 5, 12)
    results = []
    for run in (layer.forward, lambda x: layer._looped(x, layer.base(x))):
        torch.bmm = recording_bmm  # type: ignore[assignment]
        try:
            y = run(x)
        finally:
            torch.bmm = bmm  # type: ignore[assignment]
        (y * probe).sum().backward()
        results.append((y.detach(), x.grad, {n: (w.A.grad, w.B.grad) for n, w in layer.adapters.items()}))
        x.grad = None
        for w in layer.adapters.values():
            w.A.grad = w.B.grad = None
    # The second bmm of each group has B.T of [blocks, the group's largest rank, out]; bucket 4
    # holds ranks 3 and 4.
    assert sorted(shape[1] for shape in seen if shape[-1] == 12) == second_bmm_ranks
    (batched, batched_dx, batched_grads), (looped, looped_dx, looped_grads) = results
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)  # fp32, other summation order
    torch.testing.assert_close(batched_dx, looped_dx, rtol=1e-5, atol=1e-5)
    for name, expected in looped_grads.items():
        torch.testing.assert_close(batched_grads[name], expected, rtol=1e-5, atol=1e-5)


def test_cheapest_groups_weighs_padding_against_the_cost_of_a_group():
    # Buckets of ranks 4, 8, 32 with 3, 1 and 1 blocks; 1 FLOP per block and rank unit.
    blocks, ranks = (3, 1, 1), (4, 8, 32)
    assert cheapest_groups(blocks, ranks, 1.0, 0.0) == (3, 1, 1)
    assert cheapest_groups(blocks, ranks, 1.0, math.inf) == (5,)
    # Cost with c per group: one group 5*32 + c, (4, 8 | 32) 4*8 + 32 + 2c,
    # (4 | 8, 32) 3*4 + 2*32 + 2c, each alone 3*4 + 8 + 32 + 3c.
    assert cheapest_groups(blocks, ranks, 1.0, 10.0) == (3, 1, 1)  # 170, 84, 96, 82
    assert cheapest_groups(blocks, ranks, 1.0, 50.0) == (4, 1)  # 210, 164, 176, 202
    assert cheapest_groups(blocks, ranks, 1.0, 200.0) == (5,)  # 360, 464, 476, 652
    assert cheapest_groups((2,), (16,), 1.0, 0.0) == (2,)


def test_default_group_cost_splits_where_padding_dominates():
    """The CPU default keeps one group at small-tenant sizes and splits for long batches of a
    wide layer, where padding rank 4 to rank 32 is gigaFLOPs."""
    routing = LoraRouting()
    routing.set([("a", 0, 2), ("b", 2, 4)])
    cpu = torch.device("cpu")
    plan = routing.plan((0, 1), (8.0, 1.0), (4, 32), torch.float32, cpu)
    assert plan.bucket_blocks == (1, 1) and plan.bucket_ranks == (4, 32)
    assert routing.groups(plan, tokens_per_row=40, width=640, device=cpu) == (2,)
    assert routing.groups(plan, tokens_per_row=8192, width=2 * 4096 + 14336, device=cpu) == (1, 1)


@pytest.mark.parametrize("group_cost_flops", [0.0, None], ids=["bucket-groups", "default-groups"])
def test_mixed_rank_buckets_in_one_merged_pass_equal_each_run_alone(engine, group_cost_flops):
    """Ranks 4, 8, 16 and 32 (out of bucket order) in ONE forward_backward_many, each rank
    bucket in its own group or the default (one group here): each run's loss, logprobs and
    gradients equal its run alone (fp32, rtol 1e-5)."""
    engine.routing.group_cost_flops = group_cost_flops
    names = [f"rank{rank}" for rank in (32, 4, 16, 8)]  # key order (16, 32, 4, 8) is not bucket order
    for seed, name in enumerate(names):
        engine.create_adapter(name, LoraConfig(rank=int(name[4:]), seed=seed))
        train_a_little(engine, name, steps=1, seed=seed)
    generator = torch.Generator().manual_seed(7)
    items = [
        FwdBwdItem(name, [make_datum(generator, engine.vocab_size, n) for n in (40, 20 + i)], "cross_entropy", None, True)
        for i, name in enumerate(names)
    ]
    try:
        alone = []
        for item in items:
            alone.append((engine.forward_backward(*item), grads(engine, item.adapter_id)))
            clear_grads(engine, item.adapter_id)
        merged = engine.forward_backward_many(items)
        for item, (expected, expected_grads), got in zip(items, alone, merged, strict=True):
            assert got.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-5)
            for out_got, out_expected in zip(got.loss_fn_outputs, expected.loss_fn_outputs, strict=True):
                torch.testing.assert_close(
                    out_got["logprobs"].to_torch(), out_expected["logprobs"].to_torch(), rtol=1e-5, atol=1e-6
                )
            for g, e in zip(grads(engine, item.adapter_id), expected_grads, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))
    finally:
        engine.routing.group_cost_flops = None
        for name in names:
            engine.remove_adapter(name)


def test_new_adapter_is_the_base_model_exactly(engine):
    engine.create_adapter("fresh", LoraConfig(rank=8, seed=0))
    engine.snapshot_sampler("fresh", "fresh-sampler")
    tokens = list(range(3, 40))
    try:
        assert engine.compute_logprobs("fresh-sampler", tokens) == engine.compute_logprobs(None, tokens)
    finally:
        engine.remove_sampler("fresh-sampler")
        engine.remove_adapter("fresh")


def test_seed_determinism(engine):
    first = engine.create_adapter("s1", LoraConfig(rank=4, seed=7))
    engine.create_adapter("s2", LoraConfig(rank=4, seed=7))
    engine.create_adapter("s3", LoraConfig(rank=4, seed=8))
    random_seed = engine.create_adapter("s4", LoraConfig(rank=4))
    engine.create_adapter("s5", LoraConfig(rank=4, seed=random_seed.seed))
    try:
        assert first.seed == 7 and random_seed.seed is not None
        weights = {name: engine._adapter(name).parameters() for name in ("s1", "s2", "s3", "s4", "s5")}
        for a, b in zip(weights["s1"], weights["s2"], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(weights["s4"], weights["s5"], strict=True):
            assert torch.equal(a, b)
        assert not torch.equal(weights["s1"][0], weights["s3"][0])
        assert all(torch.count_nonzero(B) == 0 for B in weights["s1"][1::2])
        with pytest.raises(ValueError, match="already exists"):
            engine.create_adapter("s1", LoraConfig(rank=4))
    finally:
        for name in ("s1", "s2", "s3", "s4", "s5"):
            engine.remove_adapter(name)


# peft's own notices about tied lm_head adapters and a transformers deprecation inside peft.
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("tied", "config", "leaves"),
    [
        (
            False,
            LoraConfig(rank=8, seed=1),
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"},
        ),
        (
            False,
            LoraConfig(rank=4, seed=2, train_attn=False),
            {"gate_proj", "up_proj", "down_proj", "lm_head"},
        ),
        (
            True,
            LoraConfig(rank=8, seed=3, train_mlp=False),
            {"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"},
        ),
    ],
)
def test_peft_round_trip(tied, config, leaves, model_path, tied_path, engine, tmp_path):
    """peft loads the saved files unchanged and computes the same distribution as the engine."""
    path = tied_path if tied else model_path
    engine = ModelEngine("tiny-llama", path) if tied else engine
    engine.create_adapter("peft", config)
    try:
        train_a_little(engine, "peft", steps=3)
        engine.save_sampler_weights("peft", tmp_path / "adapter")
        engine.snapshot_sampler("peft", "peft-sampler")
        engine.load_sampler("peft-loaded", tmp_path / "adapter")
        peft_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert set(peft_config["target_modules"]) == leaves
        assert peft_config["r"] == config.rank and peft_config["lora_alpha"] == 32

        reference = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter"
        )
        reference.eval()
        tokens = torch.randint(
            0, engine.vocab_size, (40,), generator=torch.Generator().manual_seed(5)
        ).tolist()
        with torch.no_grad():
            logprobs = reference(input_ids=torch.tensor([tokens])).logits[0].log_softmax(-1)
        expected = [None, *logprobs[:-1].gather(-1, torch.tensor(tokens[1:])[:, None]).squeeze(-1).tolist()]
        base = engine.compute_logprobs(None, tokens)
        for sampler in ("peft-sampler", "peft-loaded"):
            got = engine.compute_logprobs(sampler, tokens)
            assert got[0] is None
            torch.testing.assert_close(torch.tensor(got[1:]), torch.tensor(expected[1:]), rtol=0, atol=1e-5)
        assert max(abs(a - b) for a, b in zip(base[1:], expected[1:], strict=True)) > 1e-3  # B != 0
    finally:
        engine.remove_adapter("peft")
        for sampler in ("peft-sampler", "peft-loaded"):
            if engine.has_sampler(sampler):
                engine.remove_sampler(sampler)


def test_invalid_items_fail_alone(engine):
    engine.create_adapter("ok", LoraConfig(rank=4, seed=0))
    generator = torch.Generator().manual_seed(0)
    good = FwdBwdItem("ok", [make_datum(generator, engine.vocab_size, 6)], "cross_entropy", None, True)
    too_long = Datum(
        model_input=ModelInput.from_ints([1] * (engine.max_context_length + 1)),
        loss_fn_inputs={"target_tokens": [1] * (engine.max_context_length + 1)},
    )
    bad_id = Datum(
        model_input=ModelInput.from_ints([1, engine.vocab_size]),
        loss_fn_inputs={"target_tokens": [1, 2], "weights": [1.0, 1.0]},
    )
    bad_target = Datum(
        model_input=ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": [1, engine.vocab_size + 5], "weights": [1.0, 1.0]},
    )
    no_weights = Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [1, 2]})
    try:
        alone = engine.forward_backward(*good)
        clear_grads(engine, "ok")
        results = engine.forward_backward_many(
            [
                FwdBwdItem("ok", [too_long], "cross_entropy", None, True),
                FwdBwdItem("ok", [bad_id], "cross_entropy", None, True),
                good,
                FwdBwdItem("ok", [bad_target], "cross_entropy", None, True),
                FwdBwdItem("missing", good.data, "cross_entropy", None, True),
                FwdBwdItem("ok", [no_weights], "cross_entropy", None, True),
            ]
        )
        assert isinstance(results[0], ValueError) and "tokens (context length)" in str(results[0])
        assert isinstance(results[1], ValueError) and "data[0].model_input: expected token ids" in str(results[1])
        assert results[2].metrics == alone.metrics
        assert isinstance(results[3], ValueError) and "target_tokens" in str(results[3])
        assert isinstance(results[4], KeyError) and "missing" in str(results[4])
        assert isinstance(results[5], ValueError) and "weights" in str(results[5])
        with pytest.raises(ValueError, match="model_input"):
            engine.forward_backward("ok", [bad_id], "cross_entropy", None, backward=False)
    finally:
        engine.remove_adapter("ok")
