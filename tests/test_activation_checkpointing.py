"""Activation checkpointing of a large training pass: the same numbers, less kept for backward."""

from __future__ import annotations

import argparse

import pytest
import torch
from test_engine_lora import clear_grads, grads, make_datum, train_a_little
from transformers.modeling_layers import GradientCheckpointingLayer

from tinker.types import LoraConfig
from tinker_backend.engine.model_engine import DEFAULT_CHECKPOINT_TOKENS, FwdBwdItem, ModelEngine
from tinker_backend.engine.trainer import recomputed_activations
from tinker_backend.engines import EnginePool
from tinker_backend.limits import Limits, add_arguments, from_args
from tinker_backend.model_registry import resolve_model


@pytest.fixture(scope="module")
def engine():
    return ModelEngine("tiny-llama", resolve_model("tiny-llama"), checkpoint_tokens=None)


def _items(engine: ModelEngine, names: list[str]) -> list[FwdBwdItem]:
    generator = torch.Generator().manual_seed(3)
    return [
        FwdBwdItem(name, [make_datum(generator, engine.vocab_size, n) for n in (48, 30 + 5 * i)], "cross_entropy", None, True)
        for i, name in enumerate(names)
    ] + [FwdBwdItem(names[0], [make_datum(generator, engine.vocab_size, 20)], "cross_entropy", None, False)]


def _saved_bytes(engine: ModelEngine, items: list[FwdBwdItem]) -> int:
    """Bytes of the tensors the pass keeps for its backward outside checkpointed layers (inside
    them, the checkpoint's own hooks take the tensors, and keep only the layers' inputs)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        engine.forward_backward_many(items)
    return total


def test_recomputed_activations_give_the_same_results_and_gradients(engine):
    """Two runs (ranks 4 and 16) and a forward-only item in one merged pass, with and without
    checkpointing: losses, logprobs and gradients are equal (fp32), the checkpointed pass keeps
    far fewer bytes for its backward, and the layers are as before afterwards."""
    names = ["ckpt-a", "ckpt-b"]
    for seed, (name, rank) in enumerate(zip(names, (4, 16), strict=True)):
        engine.create_adapter(name, LoraConfig(rank=rank, seed=seed))
        train_a_little(engine, name, steps=1, seed=seed)
    items = _items(engine, names)
    try:
        runs = {}
        for checkpoint_tokens in (None, 1):
            engine.checkpoint_tokens = checkpoint_tokens
            results = engine.forward_backward_many(items)
            runs[checkpoint_tokens] = (results, {name: grads(engine, name) for name in names})
            for name in names:
                clear_grads(engine, name)
        (plain, plain_grads), (recomputed, recomputed_grads) = runs[None], runs[1]
        for got, expected in zip(recomputed, plain, strict=True):
            assert got.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-6)
            for out_got, out_expected in zip(got.loss_fn_outputs, expected.loss_fn_outputs, strict=True):
                torch.testing.assert_close(
                    out_got["logprobs"].to_torch(), out_expected["logprobs"].to_torch(), rtol=1e-6, atol=1e-6
                )
        for name in names:
            assert all(g is not None for g in recomputed_grads[name])
            for g, e in zip(recomputed_grads[name], plain_grads[name], strict=True):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6 * float(e.abs().max()))

        engine.checkpoint_tokens = None
        kept_plain = _saved_bytes(engine, items)
        engine.checkpoint_tokens = 1
        kept_recomputed = _saved_bytes(engine, items)
        assert kept_recomputed < 0.6 * kept_plain, (kept_recomputed, kept_plain)
        for name in names:
            clear_grads(engine, name)
    finally:
        engine.checkpoint_tokens = None
        for name in names:
            engine.remove_adapter(name)
    layers = [m for m in engine.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all("forward" not in layer.__dict__ for layer in layers)


def test_small_passes_and_forward_only_passes_are_not_checkpointed(engine, monkeypatch):
    """Below ``checkpoint_tokens`` padded tokens (rows x longest row), or without a backward, the
    layers keep their activations as usual."""
    used = []

    def spy(model):
        used.append(True)
        return recomputed_activations(model)

    monkeypatch.setattr("tinker_backend.engine.trainer.recomputed_activations", spy)
    engine.create_adapter("ckpt-small", LoraConfig(rank=8, seed=0))
    generator = torch.Generator().manual_seed(0)
    data = [make_datum(generator, engine.vocab_size, n) for n in (40, 10)]  # 2 rows x 40 = 80 padded tokens
    try:
        engine.checkpoint_tokens = 81
        engine.forward_backward("ckpt-small", data, "cross_entropy", None, backward=True)
        engine.forward_backward("ckpt-small", data * 4, "cross_entropy", None, backward=False)
        assert used == []
        engine.checkpoint_tokens = 80
        engine.forward_backward("ckpt-small", data, "cross_entropy", None, backward=True)
        assert used == [True]
    finally:
        engine.checkpoint_tokens = None
        engine.remove_adapter("ckpt-small")


@pytest.mark.parametrize(("argv", "engine_option"), [([], DEFAULT_CHECKPOINT_TOKENS), (["--checkpoint-tokens", "0"], None),
                                                     (["--checkpoint-tokens", "512"], 512)])
def test_checkpoint_tokens_option_reaches_the_engine_options(tmp_path, argv, engine_option):
    """``tinker-server --checkpoint-tokens N`` becomes the engines' ``checkpoint_tokens`` (0: never)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    pool = EnginePool(tmp_path, from_args(parser.parse_args(argv)), sampler="torch", allow_local_models=False)
    options = pool._engine_options("tiny-llama", pool.deployment.placement("tiny-llama"))
    assert options["checkpoint_tokens"] == engine_option
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint-tokens", "-1"])


def test_checkpoint_tokens_limit():
    assert Limits().checkpoint_tokens == DEFAULT_CHECKPOINT_TOKENS == 2048  # the server's and the engine's
    with pytest.raises(ValueError, match=r"checkpoint_tokens: expected an int >= 0, got -1"):
        Limits(checkpoint_tokens=-1)
