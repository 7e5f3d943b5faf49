"""The joint AdamW update (``optimizer.adamw_steps``) equals torch's AdamW run per adapter.

Several adapters of ranks 4/8/16/32, with different hyper-parameters, clipping and weight decay,
step together over flat buffers; each must end with the weights and AdamW state that its own
``torch.optim.AdamW`` gives: bitwise against the fused kernel per tensor, and at fp32 rounding
against the plain (for-loop) implementation, an independent reference.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tinker.types import AdamParams, LoraConfig
from tinker_backend.engine.optimizer import adamw_steps, flat_gradients
from tinker_backend.engine.trainer import TrainableAdapter

SHAPES = {"q": (24, 16), "down": (16, 40), "lm_head": (72, 16)}  # module: (out, in)


def make_adapter(rank: int, seed: int) -> TrainableAdapter:
    generator = torch.Generator().manual_seed(seed)
    weights = {
        path: (torch.randn(rank, n_in, generator=generator), torch.randn(n_out, rank, generator=generator))
        for path, (n_out, n_in) in SHAPES.items()
    }
    return TrainableAdapter(f"train:{seed}", LoraConfig(rank=rank, seed=seed), weights, 32 / rank, torch.device("cpu"))


def set_grads(adapter: TrainableAdapter, seed: int, skip: int | None = None) -> list[torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    grads: list[torch.Tensor | None] = []
    for i, p in enumerate(adapter.parameters()):
        p.grad = None if i == skip else torch.randn(p.shape, generator=generator)
        grads.append(None if p.grad is None else p.grad.clone())
    return grads


class Reference:
    """The same adapter's tensors, stepped by ``torch.optim.AdamW`` alone."""

    def __init__(self, adapter: TrainableAdapter, fused: bool) -> None:
        self.params = [torch.nn.Parameter(p.detach().clone()) for p in adapter.parameters()]
        self.fused = fused
        self.optimizer = torch.optim.AdamW(self.params, fused=fused, foreach=False if not fused else None)

    def step(self, grads: list[torch.Tensor | None], adam: AdamParams) -> None:
        for p, g in zip(self.params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        if adam.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, adam.grad_clip_norm, foreach=False)
        for group in self.optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


ADAMS = [
    AdamParams(learning_rate=1e-2),
    AdamParams(learning_rate=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1),
    AdamParams(learning_rate=1e-2, grad_clip_norm=0.5),
    AdamParams(learning_rate=1e-3, weight_decay=0.01),
]


def check(adapter: TrainableAdapter, reference: Reference, exact: bool) -> None:
    compare = torch.equal if exact else lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    for got, want in zip(adapter.parameters(), reference.params, strict=True):
        assert compare(got.detach(), want.detach())
        state, expected = adapter.optimizer.state.get(got), reference.optimizer.state.get(want)
        assert (state is None) == (expected is None)
        if state is not None:
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert compare(state[name].float(), expected[name].float()), name


@pytest.mark.parametrize("fused", [True, False], ids=["vs-fused-bitwise", "vs-for-loop"])
def test_joint_flat_update_equals_each_adapter_alone(fused):
    adapters = [make_adapter(rank, seed) for seed, rank in enumerate((4, 8, 16, 32))]
    references = [Reference(a, fused) for a in adapters]
    for step in range(4):
        grads = [set_grads(a, 100 * step + i, skip=0 if (step, i) == (1, 3) else None) for i, a in enumerate(adapters)]
        for adapter, adam in zip(adapters, ADAMS, strict=True):
            adapter.clip_and_measure(adam)
        adamw_steps(list(zip(adapters, ADAMS, strict=True)))
        for adapter, reference, g, adam in zip(adapters, references, grads, ADAMS, strict=True):
            reference.step(g, adam)
            check(adapter, reference, exact=fused)
            assert all(p.grad is None for p in adapter.parameters())
        if step == 2:  # a state_dict round trip (as a checkpoint or offload does) breaks the views
            for adapter in adapters:
                adapter.optimizer.load_state_dict(copy.deepcopy(adapter.optimizer.state_dict()))
    assert [a.step for a in adapters] == [4] * 4


def test_adapters_step_as_flat_views_after_the_first_joint_update():
    adapter = make_adapter(8, 0)
    set_grads(adapter, 1)
    adamw_steps([(adapter, ADAMS[0])])
    flat = adapter.flat_state
    assert flat is not None
    start, size = flat.params.data_ptr(), flat.params.element_size()
    offset = 0
    for p in adapter.parameters():  # the weights the LoRA layers use are views of the flat tensor
        assert p.data_ptr() == start + offset * size
        assert adapter.optimizer.state[p]["exp_avg"].data_ptr() == flat.exp_avg.data_ptr() + offset * size
        offset += p.numel()
    assert offset == flat.params.numel()
    set_grads(adapter, 2)
    adamw_steps([(adapter, ADAMS[0])])
    assert adapter.flat_state is flat  # views intact: nothing rebuilt
    assert flat.steps.tolist() == [2.0] * len(adapter.parameters())


def test_autograd_accumulates_into_flat_gradients_and_the_update_stays_exact():
    """After the first step, a backward pass writes the gradients straight into one flat tensor
    (``flat_gradients``), accumulating over two passes; the update equals AdamW's."""
    adapter = make_adapter(16, 3)
    reference = Reference(adapter, fused=True)
    probes = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(reference.params)]
    for step in range(3):
        if step:
            flat_gradients(adapter)
            flat_grad = adapter.parameters()[0].grad._base
            assert flat_grad is not None and flat_grad.numel() == adapter.flat_state.params.numel()
        for _ in range(2):  # two passes accumulate, as two forward_backward calls do
            sum((p * p * probe).sum() for p, probe in zip(adapter.parameters(), probes, strict=True)).backward()
            sum((p * p * probe).sum() for p, probe in zip(reference.params, probes, strict=True)).backward()
        if step:  # accumulated in place, in the flat tensor
            assert all(p.grad._base is flat_grad for p in adapter.parameters())
        grads = [p.grad.clone() for p in reference.params]
        adamw_steps([(adapter, ADAMS[1])])
        reference.step(grads, ADAMS[1])
        check(adapter, reference, exact=True)
