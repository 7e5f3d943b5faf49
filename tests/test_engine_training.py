"""Training semantics of ``ModelEngine``: learning, gradient accumulation, AdamW and checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from tinker.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams
from tinker_backend.checkpoints import atomic_directory
from tinker_backend.engine.model_engine import ModelEngine
from tinker_backend.model_registry import resolve_model

TEXT = "The quick brown fox jumps over the lazy dog."


def next_token_datum(tokens: list[int]) -> Datum:
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def random_data(engine: ModelEngine, n: int, seed: int = 0) -> list[Datum]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 16, (n,), generator=generator).tolist()
    return [
        next_token_datum(torch.randint(0, engine.vocab_size, (length,), generator=generator).tolist())
        for length in lengths
    ]


def weights_of(engine: ModelEngine, adapter_id: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine._adapter(adapter_id).parameters()]


def grads_of(engine: ModelEngine, adapter_id: str) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in engine._adapter(adapter_id).parameters()]


def train_step(engine: ModelEngine, adapter_id: str, data: list[Datum], lr: float = 1e-2) -> float:
    out = engine.forward_backward(adapter_id, data, "cross_entropy", None, backward=True)
    engine.optim_step(adapter_id, AdamParams(learning_rate=lr))
    return out.metrics["loss:sum"]


@pytest.fixture(scope="module")
def engine():
    return ModelEngine("tiny-llama", resolve_model("tiny-llama"))


@pytest.fixture
def adapter(engine):
    """A fresh rank-8 adapter, removed (with any samplers named after it) after the test."""
    engine.create_adapter("run", LoraConfig(rank=8, seed=0))
    yield "run"
    for name in ("run", "copy", "fresh"):
        if engine.has_adapter(name):
            engine.remove_adapter(name)
    if engine.has_sampler("run-sampler"):
        engine.remove_sampler("run-sampler")


def test_memorises_text_and_samples_it_back(engine, adapter):
    tokens = engine.tokenizer.encode(TEXT)
    data = [next_token_datum(tokens)]
    losses = [train_step(engine, adapter, data, lr=5e-3) for _ in range(25)]
    assert losses[-1] < 0.1 * losses[0]
    engine.snapshot_sampler(adapter, "run-sampler")
    response = engine.sample(
        "run-sampler", tokens[:2], 1, SamplingParams(max_tokens=len(tokens) - 2, temperature=0)
    )
    assert engine.tokenizer.decode(tokens[:2] + response.sequences[0].tokens) == TEXT


def test_gradients_accumulate_until_optim_step(engine, adapter):
    data = random_data(engine, 4)
    whole = engine.forward_backward(adapter, data, "cross_entropy", None, backward=True)
    expected = grads_of(engine, adapter)
    engine._adapter(adapter).optimizer.zero_grad(set_to_none=True)
    first = engine.forward_backward(adapter, data[:2], "cross_entropy", None, backward=True)
    second = engine.forward_backward(adapter, data[2:], "cross_entropy", None, backward=True)
    assert first.metrics["loss:sum"] + second.metrics["loss:sum"] == pytest.approx(
        whole.metrics["loss:sum"], rel=1e-5
    )
    for got, want in zip(grads_of(engine, adapter), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    metrics = engine.optim_step(adapter, AdamParams(learning_rate=1e-3))
    assert all(key.count(":") == 1 for key in metrics)
    assert all(g is None for g in grads_of(engine, adapter))


def test_forward_has_no_side_effects(engine, adapter):
    data = random_data(engine, 3)
    train_step(engine, adapter, data)
    before = weights_of(engine, adapter)
    forward = engine.forward_backward(adapter, data, "cross_entropy", None, backward=False)
    assert all(g is None for g in grads_of(engine, adapter))
    backward = engine.forward_backward(adapter, data, "cross_entropy", None, backward=True)
    accumulated = grads_of(engine, adapter)
    engine.forward_backward(adapter, data, "cross_entropy", None, backward=False)
    for got, want in zip(grads_of(engine, adapter), accumulated, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(weights_of(engine, adapter), before, strict=True):
        assert torch.equal(got, want)
    assert forward.metrics == backward.metrics
    assert engine._adapter(adapter).step == 1


def test_save_and_load_state_resume_exactly(engine, adapter, tmp_path):
    data = random_data(engine, 3)
    for _ in range(2):
        train_step(engine, adapter, data)
    saved = weights_of(engine, adapter)
    engine.save_state(adapter, tmp_path / "ckpt")
    state = json.loads((tmp_path / "ckpt" / "tinker_state.json").read_text())
    assert state["lora_config"]["seed"] == 0 and state["lora_config"]["rank"] == 8
    assert state["step"] == 2 and state["base_model"] == "tiny-llama"
    assert (tmp_path / "ckpt" / "optimizer.pt").is_file()

    expected_loss = train_step(engine, adapter, data)
    expected = weights_of(engine, adapter)

    config = engine.load_state("copy", tmp_path / "ckpt", include_optimizer=True)
    assert config == LoraConfig(rank=8, seed=0)
    for got, want in zip(weights_of(engine, "copy"), saved, strict=True):
        assert torch.equal(got, want)
    assert train_step(engine, "copy", data) == expected_loss
    for got, want in zip(weights_of(engine, "copy"), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    engine.load_state(adapter, tmp_path / "ckpt", include_optimizer=True)  # overwrite in place
    for got, want in zip(weights_of(engine, adapter), saved, strict=True):
        assert torch.equal(got, want)
    assert engine._adapter(adapter).step == 2


def test_load_without_optimizer_resets_adam(engine, adapter, tmp_path):
    data = random_data(engine, 3)
    for _ in range(2):
        train_step(engine, adapter, data)
    engine.save_state(adapter, tmp_path / "ckpt")
    engine.load_state("fresh", tmp_path / "ckpt", include_optimizer=False)
    assert engine._adapter("fresh").optimizer.state_dict()["state"] == {}
    engine.load_state("copy", tmp_path / "ckpt", include_optimizer=True)
    train_step(engine, "fresh", data)
    train_step(engine, "copy", data)
    fresh, resumed = weights_of(engine, "fresh"), weights_of(engine, "copy")
    assert any(not torch.equal(a, b) for a, b in zip(fresh, resumed, strict=True))


def test_load_state_of_sampler_weights_needs_no_optimizer(engine, adapter, tmp_path):
    train_step(engine, adapter, random_data(engine, 2))
    engine.save_sampler_weights(adapter, tmp_path / "sampler")
    assert not (tmp_path / "sampler" / "optimizer.pt").exists()
    with pytest.raises(FileNotFoundError, match="optimizer"):
        engine.load_state("copy", tmp_path / "sampler", include_optimizer=True)
    config = engine.load_state("copy", tmp_path / "sampler", include_optimizer=False)
    assert config.rank == 8 and config.train_attn and config.train_mlp and config.train_unembed
    for got, want in zip(weights_of(engine, "copy"), weights_of(engine, adapter), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_grad_clipping_bounds_the_update(engine, adapter, clip):
    engine.forward_backward(adapter, random_data(engine, 3), "cross_entropy", None, backward=True)
    metrics = engine.optim_step(adapter, AdamParams(learning_rate=1e-3, beta1=0.9, grad_clip_norm=clip))
    grad_norm = metrics["grad_norm:max"]
    assert grad_norm > 1.0  # the pre-clipping norm is reported
    optimizer = engine._adapter(adapter).optimizer
    first_moment = torch.linalg.vector_norm(
        torch.stack([s["exp_avg"].norm() for s in optimizer.state.values()])
    )
    # After one step exp_avg = (1 - beta1) * g, so its norm shows the norm of the applied gradient.
    applied = clip if clip else grad_norm
    assert float(first_moment) == pytest.approx(0.1 * applied, rel=1e-4)


def test_atomic_directory_replaces_only_on_success(tmp_path):
    destination = tmp_path / "ckpt"
    destination.mkdir()
    (destination / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(destination) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("crash while writing")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert [p.name for p in destination.iterdir()] == ["old"]
    with atomic_directory(destination) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert [p.name for p in destination.iterdir()] == ["new"]
