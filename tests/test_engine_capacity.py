"""More runs than slots: adapters move to host memory and disk and come back exactly."""

import random

import pytest
import torch

from tinker.types import AdamParams, Datum, LoraConfig, ModelInput
from tinker_backend.engine.model_engine import FwdBwdItem, ModelEngine
from tinker_backend.model_registry import resolve_model


def data(seed: int) -> list[Datum]:
    rng = random.Random(seed)
    tokens = [rng.randrange(3, 2000) for _ in range(12)]
    return [Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 11})]


def script(engine: ModelEngine, runs: int) -> list[float]:
    """Interleave runs so that adapters leave and come back between fb and optim_step."""
    for r in range(runs):
        engine.create_adapter(f"run{r}", LoraConfig(rank=2 + r, seed=r))
    losses = []
    for step in range(3):
        for r in range(runs):  # gradients accumulate while other runs push this one out
            out = engine.forward_backward(f"run{r}", data(r * 10 + step), "cross_entropy", None, True)
            losses.append(out.metrics["loss:sum"])
        for r in reversed(range(runs)):
            engine.optim_step(f"run{r}", AdamParams(learning_rate=1e-2))
        pair = engine.forward_backward_many(
            [FwdBwdItem("run0", data(1), "cross_entropy", None, False),
             FwdBwdItem(f"run{runs - 1}", data(2), "cross_entropy", None, False)]
        )
        losses.extend(p.metrics["loss:sum"] for p in pair)
    return losses


@pytest.fixture(scope="module")
def model_path():
    return resolve_model("tiny-llama")


def test_offloaded_runs_train_exactly_like_resident_ones(model_path, tmp_path):
    reference = script(ModelEngine("tiny-llama", model_path), runs=5)
    small = ModelEngine("tiny-llama", model_path, max_slots=2, max_host_adapters=1, offload_dir=tmp_path)
    assert script(small, runs=5) == reference
    tiers = small._adapters.tiers()
    assert tiers["slots"] == 2 and tiers["host"] == 1 and tiers["disk"] == 2
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_a_pass_needing_more_adapters_than_slots_is_refused_with_numbers(model_path, tmp_path):
    engine = ModelEngine("tiny-llama", model_path, max_slots=2, max_host_adapters=4, offload_dir=tmp_path)
    for r in range(3):
        engine.create_adapter(f"run{r}", LoraConfig(rank=2, seed=r))
    with pytest.raises(ValueError, match="needs 3 adapters but the engine has 2 slots"):
        engine.forward_backward_many([FwdBwdItem(f"run{r}", data(r), "cross_entropy") for r in range(3)])


def test_removed_offloaded_adapter_leaves_no_file(model_path, tmp_path):
    engine = ModelEngine("tiny-llama", model_path, max_slots=1, max_host_adapters=0, offload_dir=tmp_path)
    engine.create_adapter("a", LoraConfig(rank=2, seed=0))
    engine.create_adapter("b", LoraConfig(rank=2, seed=1))
    assert len(list(tmp_path.glob("*.pt"))) == 1
    engine.remove_adapter("a")
    assert not list(tmp_path.glob("*.pt"))
    assert not engine.has_adapter("a") and engine.has_adapter("b")
    with torch.no_grad():
        assert engine.forward_backward("b", data(0), "cross_entropy", None, False).metrics["loss:sum"] > 0
