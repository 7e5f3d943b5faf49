"""AdamW for many LoRA adapters at once: one fused update over flat per-adapter buffers.

An adapter has two tensors per LoRA module (30 for the 15 modules of tiny-llama). Updating them
one by one costs the CPU fused kernel ~10 us and a thread-pool dispatch per tensor: 32 adapters
(960 tensors) took ~12 ms on one thread and ~60 ms on two threads of a loaded 2-core machine.
So each adapter keeps its weights as views of ONE flat tensor (``flatten``) and, once it has
stepped, its AdamW moments and step counts as views of flat tensors too (``FlatState``), stored
in its ``torch.optim.AdamW`` state as usual, so ``state_dict`` and checkpoints do not change.
``adamw_steps`` then updates each adapter as one tensor: AdamW is elementwise, so the result
equals updating every tensor alone. Whatever breaks the views (a device move, a loaded
``state_dict``, a reset optimizer) is noticed by pointer and the buffers are built again; an
adapter whose tensors cannot be flat (some without a gradient or state) is updated per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn
from torch.optim.adam import adam as adam_update

from tinker.types import AdamParams

if TYPE_CHECKING:
    from .trainer import TrainableAdapter

__all__ = ["FlatState", "adamw_steps", "flat_gradients", "flatten"]


def flatten(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """Copy ``params`` into one flat tensor and make each of them a view of it; returns it."""
    flat = torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)
    _point_into(flat, params)
    return flat


def _point_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.data = flat[offset : offset + t.numel()].view_as(t)
        offset += t.numel()


def _views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    views, offset = [], 0
    for t in like:
        views.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return views


class FlatState(NamedTuple):
    """An adapter's weights, AdamW moments and per-tensor step counts as flat tensors."""

    params: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    steps: torch.Tensor  # [tensors]: the ``step`` of each tensor's state, all equal
    pointers: tuple[int, ...]  # where every weight view starts: changed pointers mean broken views
    state: Any  # the optimizer's state object the views were put in (a new one after a load)


def flat_gradients(adapter: TrainableAdapter) -> None:
    """Before a backward pass: give an adapter with flat buffers and no gradient yet zero
    gradients that are views of one new flat tensor, so that autograd accumulates into them in
    place and ``adamw_steps`` needs no copy. A new tensor each time: older gradients handed out
    (e.g. kept aside by a sharded pass) must not change."""
    flat = adapter.flat_state
    params = adapter.parameters()
    if flat is None or any(p.grad is not None for p in params) or not _intact(flat, adapter, params):
        return
    for p, grad in zip(params, _views(torch.zeros_like(flat.params), params), strict=True):
        p.grad = grad


def _intact(flat: FlatState, adapter: TrainableAdapter, params: Sequence[nn.Parameter]) -> bool:
    return adapter.optimizer.state is flat.state and tuple(p.data_ptr() for p in params) == flat.pointers


def _flat_grad(flat: FlatState, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """The gradients as one flat tensor: the one they are views of (``flat_gradients``), or a copy."""
    grads = [p.grad for p in params]
    base = grads[0]._base  # type: ignore[union-attr]
    if base is not None and base.shape == flat.params.shape:
        shift = base.data_ptr() - flat.params.data_ptr()
        if tuple(g.data_ptr() - shift for g in grads) == flat.pointers:  # type: ignore[union-attr]
            return base
    return torch.cat([g.reshape(-1) for g in grads])  # type: ignore[union-attr]


def _flat_state(adapter: TrainableAdapter, params: list[nn.Parameter]) -> FlatState | None:
    """The adapter's ``FlatState``, built again if its views were broken; None: not possible
    (some tensors have AdamW state and others not, or their step counts differ)."""
    state = adapter.optimizer.state
    cached = adapter.flat_state
    if cached is not None and _intact(cached, adapter, params):
        return cached
    states = [state.get(p) for p in params]
    flat = flatten(params)  # a copy, only when the views were broken (rare)
    if not any(states):  # as torch.optim.Adam._init_group does for fused=True, but flat
        exp_avg, exp_avg_sq = torch.zeros_like(flat), torch.zeros_like(flat)
        steps = torch.zeros(len(params), dtype=torch.float32, device=flat.device)
    elif all(states):
        steps = torch.stack([s["step"] for s in states]).to(torch.float32)  # type: ignore[index]
        if not bool((steps == steps[0]).all()):
            return None
        exp_avg = torch.cat([s["exp_avg"].reshape(-1) for s in states])  # type: ignore[index]
        exp_avg_sq = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])  # type: ignore[index]
    else:
        return None
    for p, m, v, step in zip(params, _views(exp_avg, params), _views(exp_avg_sq, params), steps, strict=True):
        state[p] = {"step": step, "exp_avg": m, "exp_avg_sq": v}
    adapter.flat_state = FlatState(flat, exp_avg, exp_avg_sq, steps, tuple(p.data_ptr() for p in params), state)
    return adapter.flat_state


def _per_tensor(adapter: TrainableAdapter, params: list[nn.Parameter]) -> list[list[torch.Tensor]]:
    """params, grads, exp_avgs, exp_avg_sqs, steps of the tensors with a gradient, one by one."""
    adapter.flat_state = None
    lists: list[list[torch.Tensor]] = [[], [], [], [], []]
    for p in params:
        if p.grad is None:
            continue
        state = adapter.optimizer.state[p]
        if not state:  # as torch.optim.Adam._init_group does for fused=True
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for values, value in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]), strict=True):
            values.append(value)
    return lists


def adamw_steps(steps: Sequence[tuple[TrainableAdapter, AdamParams]]) -> None:
    """Apply the AdamW step of several adapters (after their ``clip_and_measure``), then zero
    their gradients: one fused multi-tensor update per set of equal hyper-parameters and device.

    The result equals each adapter's ``torch.optim.AdamW(fused=True).step()``: the same state
    (``step``, ``exp_avg``, ``exp_avg_sq`` in each adapter's ``optimizer.state``), initialised
    the same way.
    """
    groups: dict[tuple[Any, ...], list[list[torch.Tensor]]] = {}
    flat_steps: list[torch.Tensor] = []
    for adapter, adam in steps:
        key = (adam.learning_rate, adam.beta1, adam.beta2, adam.eps, adam.weight_decay, adapter.device_key())
        group = groups.setdefault(key, [[], [], [], [], []])
        params = adapter.parameters()
        grads = [p.grad for p in params]
        flat = _flat_state(adapter, params) if params and all(g is not None for g in grads) else None
        if flat is None:
            for values, more in zip(group, _per_tensor(adapter, params), strict=True):
                values.extend(more)
            continue
        for values, value in zip(group, (flat.params, _flat_grad(flat, params), flat.exp_avg, flat.exp_avg_sq, flat.steps[0]),
                                 strict=True):
            values.append(value)
        flat_steps.append(flat.steps)
    for (lr, beta1, beta2, eps, weight_decay, _), (ps, gs, ms, vs, counts) in groups.items():
        if ps:
            adam_update(
                ps, gs, ms, vs, [], counts,
                fused=True, decoupled_weight_decay=True,
                amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
            )
    for flat_counts in flat_steps:  # the kernel counted the step in the first tensor's count
        flat_counts[1:].fill_(flat_counts[0])
    for adapter, _ in steps:
        for p in adapter.parameters():
            p.grad = None
        adapter.step += 1
