"""A 2-rank FSDP2 trainer group (gloo, CPU) computes what the single-process engine computes.

The same script of merged clock cycles (two tenants of different LoRA ranks and targets, a
forward-only request, a bad request, gradients accumulated over two cycles, cycles that leave
a rank idle) runs on ``ModelEngine`` and
on a ``TrainerGroup`` of two ``ShardedModelEngine`` ranks; losses, logprobs, gradients, AdamW
metrics and the saved weights must agree to rtol 1e-5. Checkpoints go both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tinker.types import AdamParams, Datum, LoraConfig, ModelInput
from tinker_backend.checkpoints import read_checkpoint
from tinker_backend.engine.model_engine import ModelEngine
from tinker_backend.engine.protocol import FwdBwdItem
from tinker_backend.engine.sharded import split_items
from tinker_backend.model_registry import resolve_model
from tinker_backend.workers.group import GroupSpec, TrainerGroup

RTOL = 1e-5
LR = 1e-2
# AdamW divides each element's step by that element's own gradient scale, so rounding in a
# gradient element near zero becomes up to ~1e-4 of the learning rate in the weights (8e-5
# measured). The sharp check of the updated weights is that every later cycle's losses and
# gradients, computed with them, agree to RTOL.
WEIGHTS_ATOL = 5e-4 * LR
Call = Callable[..., Any]


def datum(tokens: list[int], **extra: list[float]) -> Datum:
    n = len(tokens) - 1
    inputs: dict[str, Any] = {"target_tokens": tokens[1:], **{k: v[:n] for k, v in extra.items()}}
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def batch(seed: int, n: int, vocab: int, loss: str) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (int(torch.randint(5, 14, (1,), generator=g)),), generator=g).tolist()
        if loss == "cross_entropy":
            data.append(datum(tokens, weights=torch.rand(len(tokens), generator=g).tolist()))
        else:
            data.append(datum(tokens, logprobs=(-3 * torch.rand(len(tokens), generator=g)).tolist(),
                              advantages=torch.randn(len(tokens), generator=g).tolist()))
    return data


def script(call: Call, vocab: int, out_dir: Path) -> dict[str, Any]:
    """The same program for both engines; returns everything it observed."""
    seen: dict[str, Any] = {}
    call("create_adapter", "a", LoraConfig(rank=4, seed=1))
    call("create_adapter", "b", LoraConfig(rank=8, seed=2, train_unembed=False))
    adam = AdamParams(learning_rate=LR, grad_clip_norm=0.5)
    cycles = [
        [FwdBwdItem("a", batch(10, 3, vocab, "cross_entropy"), "cross_entropy"),
         FwdBwdItem("b", batch(11, 2, vocab, "importance_sampling"), "importance_sampling"),
         FwdBwdItem("a", batch(12, 1, vocab, "cross_entropy"), "cross_entropy", backward=False),
         FwdBwdItem("b", [datum([1, vocab + 5, 2], weights=[1.0, 1.0])], "cross_entropy")],  # bad token
        [FwdBwdItem("b", batch(20, 4, vocab, "importance_sampling"), "importance_sampling"),
         FwdBwdItem("a", batch(21, 2, vocab, "cross_entropy"), "cross_entropy")],
        [FwdBwdItem("b", batch(30, 1, vocab, "cross_entropy"), "cross_entropy")],  # one item: a rank idles
        [FwdBwdItem("a", batch(31, 1, vocab, "cross_entropy"), "cross_entropy", backward=False)],
    ]
    for c, items in enumerate(cycles):
        results = call("forward_backward_many", items)
        for i, result in enumerate(results):
            if isinstance(result, Exception):
                seen[f"cycle{c}.item{i}.error"] = str(result)
            else:
                seen[f"cycle{c}.item{i}.loss"] = result.metrics["loss:sum"]
                seen[f"cycle{c}.item{i}.logprobs"] = [o["logprobs"].to_torch() for o in result.loss_fn_outputs]
        for run in ("a", "b"):
            seen[f"cycle{c}.{run}.grads"] = call("gradients", run)
            if c < 3 and (run, c) != ("b", 0):  # b accumulates the gradients of cycles 0 and 1
                seen[f"cycle{c}.{run}.optim"] = call("optim_step", run, adam)
    for run in ("a", "b"):
        call("save_state", run, out_dir / run)
    return seen


def assert_close(expected: Any, actual: Any, where: str, atol: float | None = None) -> None:
    if isinstance(expected, dict):
        assert set(expected) == set(actual), where
        for key in expected:
            assert_close(expected[key], actual[key], f"{where}.{key}", atol)
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(actual), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_close(e, a, f"{where}[{i}]", atol)
    elif isinstance(expected, torch.Tensor):
        # Sums over rows run in another order on two ranks: elements near zero of a gradient
        # differ by rounding relative to the tensor's scale, so atol is RTOL of its largest element.
        if atol is None:
            atol = RTOL * float(expected.abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{where}: {m}")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=RTOL, abs=1e-7), where
    else:
        assert actual == expected, where


@pytest.fixture(scope="module")
def single() -> ModelEngine:
    return ModelEngine("tiny-llama", resolve_model("tiny-llama"))


@pytest.fixture(scope="module")
def group() -> Iterator[TrainerGroup]:
    group = TrainerGroup(GroupSpec("tiny-llama", resolve_model("tiny-llama"), ranks=2))
    yield group
    group.stop()


def test_split_items_is_contiguous_and_balanced() -> None:
    assert split_items([5, 5, 5, 5], 2) == [[0, 1], [2, 3]]
    assert split_items([30, 1, 1, 1], 2) == [[0], [1, 2, 3]]
    assert split_items([7], 2) == [[0], []]
    shares = split_items([3, 9, 4, 4, 8, 1, 2], 3)
    assert sorted(i for share in shares for i in share) == list(range(7))
    assert all(share == list(range(share[0], share[-1] + 1)) for share in shares if share)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_equal_one_process_and_checkpoints_interchange(
    single: ModelEngine, group: TrainerGroup, tmp_path: Path
) -> None:
    expected = script(lambda method, *a: getattr(single, method)(*a), single.vocab_size, tmp_path / "single")
    actual = script(group.call, group.vocab_size, tmp_path / "group")
    assert any(key.endswith(".error") for key in expected)  # the bad request failed alone, in both
    assert_close(expected, actual, "script")
    for run in ("a", "b"):  # the group's checkpoints are ordinary ones, equal to the single engine's
        mine, theirs = read_checkpoint(tmp_path / "single" / run), read_checkpoint(tmp_path / "group" / run)
        assert_close({k: list(v) for k, v in mine.weights.items()},
                     {k: list(v) for k, v in theirs.weights.items()}, f"weights of {run}", WEIGHTS_ATOL)
        assert theirs.step == mine.step == {"a": 3, "b": 2}[run]

    # The other way round: each loads the other's checkpoint and computes the same.
    probe = [FwdBwdItem("x", batch(40, 2, single.vocab_size, "cross_entropy"), "cross_entropy")]
    single.load_state("x", tmp_path / "group" / "b", include_optimizer=True)
    group.call("load_state", "x", tmp_path / "single" / "b", True)
    [from_group] = single.forward_backward_many(probe)
    [from_single] = group.call("forward_backward_many", probe)
    assert not isinstance(from_group, Exception) and not isinstance(from_single, Exception)
    assert from_single.metrics["loss:sum"] == pytest.approx(from_group.metrics["loss:sum"], rel=RTOL)
    assert_close(single.gradients("x"), group.call("gradients", "x"), "gradients after load")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_recomputing_activations_equal_one_process_keeping_them(tmp_path: Path) -> None:
    """With activation checkpointing on every training pass (``checkpoint_tokens=1``) under
    FSDP2, the group still computes what the single process computes without it."""
    spec = GroupSpec("tiny-llama", resolve_model("tiny-llama"), ranks=2, engine_options={"checkpoint_tokens": 1})
    recomputing = TrainerGroup(spec)
    try:
        assert recomputing.call("__getattribute__", "checkpoint_tokens") == 1  # the ranks got the option
        keeping = ModelEngine("tiny-llama", resolve_model("tiny-llama"), checkpoint_tokens=None)
        expected = script(lambda method, *a: getattr(keeping, method)(*a), keeping.vocab_size, tmp_path / "single")
        actual = script(recomputing.call, recomputing.vocab_size, tmp_path / "group")
    finally:
        recomputing.stop()
    assert_close(expected, actual, "script")
