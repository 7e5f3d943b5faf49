"""Training on the shared base model: per-adapter AdamW state and merged forward/backward passes.

``forward_backward_batch`` runs the requests of many adapters as ONE padded batch. Each request
(an ``FwdBwdItem``) owns a contiguous block of rows routed to its adapter, so the gradient of
each request's loss reaches only its own adapter, and the result equals running it alone.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from tinker.types import AdamParams, ForwardBackwardOutput, LoraConfig, TensorData
from tinker.validation import check_data_for_model, check_forward_backward, resolve_loss_config

from .lora import LoraLinear, LoraRouting, LoraWeights, Segment, rank_bucket
from .losses import datum_loss
from .optimizer import FlatState, adamw_steps, flat_gradients
from .protocol import CheckedFwdBwdItem, FwdBwdItem

__all__ = [
    "FwdBwdItem", "PreparedItem", "TrainableAdapter", "adamw_steps", "forward_backward_batch", "prepare_item"
]


class TrainableAdapter:
    """A LoRA run's trainable state: fp32 weights per module path, its AdamW and step count."""

    def __init__(
        self,
        key: str,
        config: LoraConfig,
        weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        scaling: float,
        device: torch.device,
    ) -> None:
        self.key = key
        self.config = config
        self.scaling = scaling
        self.weights = {
            path: (
                nn.Parameter(A.to(device, torch.float32, copy=True)),
                nn.Parameter(B.to(device, torch.float32, copy=True)),
            )
            for path, (A, B) in sorted(weights.items())
        }
        self.step = 0
        self.optimizer = self._new_optimizer()
        self.flat_state: FlatState | None = None  # set by adamw_steps (see optimizer.py)

    def _new_optimizer(self) -> torch.optim.AdamW:
        # The hyper-parameters are set again by every optim_step. fused: one in-place kernel per
        # tensor, so memory stays flat (as with foreach=False) and a step costs a quarter as much.
        return torch.optim.AdamW(self.parameters(), lr=0.0, fused=True)

    def parameters(self) -> list[nn.Parameter]:
        """A then B of each module, in sorted path order (the order of the optimizer state)."""
        return [p for pair in self.weights.values() for p in pair]

    def attach(self, layers: Mapping[str, LoraLinear]) -> None:
        for path, (A, B) in self.weights.items():
            layers[path].adapters[self.key] = LoraWeights(A, B, self.scaling)

    def detach(self, layers: Mapping[str, LoraLinear]) -> None:
        for path in self.weights:
            layers[path].adapters.pop(self.key, None)

    def to(self, device: torch.device) -> None:
        """Move weights, accumulated gradients and AdamW moments to ``device`` (in place)."""
        for param in self.parameters():
            param.data = param.data.to(device)
            if param.grad is not None:
                param.grad = param.grad.to(device)
        for state in self.optimizer.state.values():
            for name, value in state.items():
                if torch.is_tensor(value):  # fused AdamW keeps `step` on the weights' device too
                    state[name] = value.to(device)

    def device_key(self) -> torch.device:
        """The device of the adapter's weights (they move together)."""
        return next(iter(self.weights.values()))[0].device

    def reset_optimizer(self) -> None:
        self.optimizer = self._new_optimizer()

    def optim_step(self, adam: AdamParams) -> dict[str, float]:
        """One AdamW step on the accumulated gradients (clipped if asked), then zero them."""
        metrics = self.clip_and_measure(adam)
        adamw_steps([(self, adam)])
        return metrics

    def clip_and_measure(self, adam: AdamParams) -> dict[str, float]:
        """The first half of ``optim_step``: the gradient norm (before clipping), clipping if
        asked, and the AdamW hyper-parameters set; ``adamw_steps`` then applies the update."""
        params = self.parameters()
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0
        if adam.grad_clip_norm > 0 and grads:
            nn.utils.clip_grad_norm_(params, adam.grad_clip_norm, foreach=False)
        for group in self.optimizer.param_groups:  # kept for the optimizer's state_dict
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        return {"grad_norm:max": grad_norm, "learning_rate:max": adam.learning_rate}


@dataclass
class PreparedItem:
    """A validated request: token rows, targets and loss inputs as tensors on the device."""

    key: str
    tokens: list[list[int]]
    targets: list[torch.Tensor]
    inputs: list[dict[str, torch.Tensor]]
    loss_fn: str
    config: Mapping[str, float]
    backward: bool


def prepare_item(
    item: FwdBwdItem, key: str, vocab_size: int, max_length: int, device: torch.device
) -> PreparedItem:
    """Check one request against the model and move its tensors to ``device``.

    Raises ValueError naming the offending field, so that a bad request fails alone. A
    ``CheckedFwdBwdItem`` was validated before it joined the cycle and is not validated again.
    """
    if not isinstance(item, CheckedFwdBwdItem):
        check_data_for_model(item.data, vocab_size, max_length)
        check_forward_backward(item.data, item.loss_fn, item.loss_fn_config)
    config = resolve_loss_config(item.loss_fn, item.loss_fn_config)
    tokens = [datum.model_input.to_ints() for datum in item.data]
    inputs = [{name: td.to_torch().to(device) for name, td in datum.loss_fn_inputs.items()} for datum in item.data]
    targets = [tensors["target_tokens"] for tensors in inputs]
    return PreparedItem(key, tokens, targets, inputs, item.loss_fn, config, item.backward)


@contextlib.contextmanager
def recomputed_activations(model: nn.Module) -> Iterator[None]:
    """Within the block, each decoder layer keeps only its inputs for the backward pass and
    computes its activations again there (activation checkpointing): a training pass then holds
    one layer's activations at a time instead of every layer's, for about one more forward.

    The recomputation gives the same values, so gradients are unchanged. The layers' ``forward``
    is wrapped, not ``__call__``, so module hooks (FSDP's) stay outside; the LoRA routing must
    not change before the backward pass, which ``forward_backward_batch`` runs at once.
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


def forward_backward_batch(
    model: nn.Module,
    routing: LoraRouting,
    items: Sequence[PreparedItem],
    adapters: Mapping[str, TrainableAdapter],
    checkpoint_tokens: int | None = None,
) -> list[ForwardBackwardOutput | Exception]:
    """One padded forward pass over all ``items`` (and one backward over those with ``backward``).

    ``adapters`` maps routing keys to adapters. Gradients accumulate into each adapter's
    ``.grad``. A loss that fails marks only its own item; an adapter whose every backward item
    failed keeps the gradients it had. A training pass of at least ``checkpoint_tokens`` padded
    tokens recomputes the decoder layers' activations in the backward pass instead of keeping
    them (``recomputed_activations``; None: never).
    """
    ranks = {key: adapter.config.rank for key, adapter in adapters.items()}
    order, rows, segments, first_row = _layout(items, ranks)
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    input_ids, attention_mask = _right_padded(rows, width)

    trained = {items[i].key for i in order if items[i].backward}
    untouched_grads = {key: [p for p in adapters[key].parameters() if p.grad is None] for key in trained}
    routing.set(segments)
    padded = any(len(r) < width for r in rows)
    recompute = bool(trained) and checkpoint_tokens is not None and len(rows) * width >= checkpoint_tokens
    layers = recomputed_activations(model) if recompute else contextlib.nullcontext()
    with torch.set_grad_enabled(bool(trained)), layers:
        logits = model(
            input_ids=input_ids.to(device),
            # Without padding, no mask lets attention take its faster plain-causal path.
            attention_mask=attention_mask.to(device) if padded else None,
            use_cache=False,
        ).logits
        picked = _target_logprobs(logits, [t for i in order for t in items[i].targets])
        picked_host = picked.detach().cpu()  # one device-to-host copy for all the results
        results: list[Any] = [None] * len(items)
        total = None
        succeeded = set()
        for i in order:
            item = items[i]
            try:
                rows_of_item = slice(first_row[i], first_row[i] + len(item.tokens))
                loss = _item_loss(item, picked[rows_of_item])
            except Exception as e:
                results[i] = e
                continue
            logprobs = _row_values(item, picked_host[rows_of_item])
            results[i] = ForwardBackwardOutput(
                loss_fn_output_type="ArrayRecord",
                loss_fn_outputs=[{"logprobs": TensorData.from_torch(lp)} for lp in logprobs],
                metrics={"loss:sum": float(loss.detach())},
            )
            if item.backward:
                total = loss if total is None else total + loss
                succeeded.add(item.key)
    if total is not None:
        for key in succeeded:
            flat_gradients(adapters[key])  # autograd then accumulates into one flat tensor
        total.backward()
    for key in trained - succeeded:  # backward through the shared graph left zeros there
        for p in untouched_grads[key]:
            p.grad = None
    return results


def _layout(
    items: Sequence[PreparedItem], ranks: Mapping[str, int]
) -> tuple[list[int], list[list[int]], list[Segment], dict[int, int]]:
    """Rows of the batch: items sorted by adapter, training items first, so that each adapter
    gets few segments, and adapters by rank bucket, so that a LoRA layer's buckets are
    contiguous rows (no gather). Returns (item order, token rows, segments, first row of each item)."""
    order = sorted(
        range(len(items)),
        key=lambda i: (rank_bucket(ranks.get(items[i].key, 0)), items[i].key, not items[i].backward),
    )
    rows: list[list[int]] = []
    segments: list[Segment] = []
    first_row: dict[int, int] = {}
    for i in order:
        item = items[i]
        first_row[i] = len(rows)
        rows.extend(item.tokens)
        last = segments[-1] if segments else None
        if last and (last.adapter, last.requires_grad) == (item.key, item.backward):
            segments[-1] = last._replace(stop=len(rows))  # one matmul for the adapter's rows
        else:
            segments.append(Segment(item.key, first_row[i], len(rows), item.backward))
    return order, rows, segments, first_row


def _right_padded(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, right-padded: real positions never attend to the padding."""
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in rows], dtype=torch.long)
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows], dtype=torch.long)
    return input_ids, attention_mask


def _target_logprobs(logits: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Log-probabilities [rows, T, K] of each row's targets (K: the most targets per position).

    One gather for the whole batch: slicing ``logits`` per row instead would make the backward
    write a zero tensor the size of all logits for every row. Padding entries read token 0.
    """
    rows, width, _ = logits.shape
    per_position = [t.reshape(t.shape[0], -1) for t in targets]  # [n, k] each
    index = torch.zeros(rows, width, max(t.shape[1] for t in per_position), dtype=torch.long, device=logits.device)
    for row, target in enumerate(per_position):
        index[row, : target.shape[0], : target.shape[1]] = target
    logsumexp = logits.float().logsumexp(-1)  # one kernel for all rows, padding included
    return logits.gather(-1, index).float() - logsumexp[..., None]


def _item_loss(item: PreparedItem, picked: torch.Tensor) -> torch.Tensor:
    """The summed loss of one item.

    ``picked`` [rows, T, K] holds the target log-probabilities of the item's rows of the batch.
    """
    loss = picked.new_zeros((), dtype=torch.float32)
    for target_lp, inputs in zip(_row_values(item, picked), item.inputs, strict=True):
        loss = loss + datum_loss(item.loss_fn, target_lp, inputs, item.config)
    return loss


def _row_values(item: PreparedItem, picked: torch.Tensor) -> list[torch.Tensor]:
    """The target log-probabilities of each datum of ``item``, shaped as its targets."""
    values = []
    for row, target in enumerate(item.targets):
        n = target.shape[0]
        values.append(picked[row, :n, : target.reshape(n, -1).shape[1]].reshape(target.shape))
    return values
