"""Multi-LoRA linear layers: one frozen base layer, many adapters, rows routed per adapter.

Every ``nn.Linear`` of the decoder and the output embedding is wrapped in a ``LoraLinear``.
All wrappers of one model share a ``LoraRouting``, set before each forward pass, that says
which contiguous rows of the batch use which adapter. One forward (and backward) pass then
serves many users: the base matmul runs once over the whole batch and each adapter adds its
low-rank delta to its own rows only, so gradients reach only that adapter's weights.

The scaling is ``LORA_ALPHA / rank`` with ``LORA_ALPHA = 32`` for every rank, as in Tinker:
with a fixed alpha (not alpha proportional to rank) the best learning rate hardly depends on
the rank, so users can change the rank without re-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from tinker.types import LoraConfig

__all__ = [
    "GROUP_COST_FLOPS",
    "LORA_ALPHA",
    "LayerKind",
    "LoraLinear",
    "LoraRouting",
    "LoraWeights",
    "Segment",
    "attach_lora_layers",
    "cheapest_groups",
    "init_lora_weights",
    "rank_bucket",
    "target_paths",
]

LORA_ALPHA = 32.0

LayerKind = Literal["attn", "mlp", "unembed"]

_ATTN_NAMES = frozenset({"self_attn", "attn", "attention", "self_attention"})
_MLP_NAMES = frozenset({"mlp", "feed_forward"})


class Segment(NamedTuple):
    """Rows ``[start, stop)`` of the batch use ``adapter`` (None: the base model only).

    ``requires_grad=False`` detaches the adapter's weights for these rows, so a forward-only
    request that shares a batch with training requests leaves no gradient (not even zeros).
    """

    adapter: str | None
    start: int
    stop: int
    requires_grad: bool = True


def rank_bucket(rank: int) -> int:
    """The bucket of a LoRA rank: the smallest power of two >= ``rank``.

    Adapters of one bucket are always computed together, zero-padded to the bucket's largest
    rank, so within a bucket no adapter is padded to more than twice its rank. Neighbouring
    buckets are joined where that costs less (``LoraRouting.groups``).
    """
    return 1 << max(rank - 1, 0).bit_length()


# The cost of one more rank group in a layer (forward and backward), in padded FLOPs. On CPU,
# padding a small rank costs far less than its FLOPs: a rank-4 bmm runs at a fraction of a
# rank-32's rate, and splitting never paid in docs/benchmarks.md (issue 12), up to 1.3 GFLOPs
# saved per layer. On CUDA: ~10 more kernel launches (~50 us) at ~100 TFLOP/s; not measured.
GROUP_COST_FLOPS = {"cpu": 2e9, "cuda": 5e9}


class _Plan(NamedTuple):
    """How one layer's batched delta lays out the rows of its adapters (see ``LoraLinear``).

    The adapters' rows are cut into ``len(blocks)`` blocks of ``length`` rows each (a segment
    longer than ``length`` gives several blocks, a shorter one is padded), sorted by the rank
    bucket of their adapter. ``bucket_blocks`` and ``bucket_ranks`` are the number of blocks and
    the largest rank of each bucket, in that order: a layer computes contiguous runs of buckets
    as one group (see ``LoraRouting.groups``), with two ``bmm`` per group.
    """

    blocks: tuple[int, ...]  # the segment (its index in the routing) of each block, by bucket
    bucket_blocks: tuple[int, ...]
    bucket_ranks: tuple[int, ...]
    length: int
    row_index: torch.Tensor | None  # [blocks * length] batch row of each block row; None: rows 0..n in order
    mask: torch.Tensor | None  # [blocks * length] 1 for a real row, 0 for padding; None: no padding
    scale: torch.Tensor  # [blocks, 1, 1] the scaling of each block's adapter


def cheapest_groups(
    bucket_blocks: tuple[int, ...], bucket_ranks: tuple[int, ...], block_flops: float, group_cost: float
) -> tuple[int, ...]:
    """Blocks per group when the buckets (ascending ranks) are cut into contiguous groups.

    A group pads every block to its largest rank and costs ``block_flops`` per block and rank
    unit plus ``group_cost``; the cut minimises the total (exactly: at most a few buckets).
    """
    n = len(bucket_blocks)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for stop in range(1, n + 1):
        for start in range(stop):
            cost = best[start] + group_cost + sum(bucket_blocks[start:stop]) * bucket_ranks[stop - 1] * block_flops
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    sizes, stop = [], n
    while stop:
        sizes.append(sum(bucket_blocks[cut[stop] : stop]))
        stop = cut[stop]
    return tuple(reversed(sizes))


class LoraRouting:
    """Which rows of the next forward pass use which adapter; shared by all ``LoraLinear``s."""

    def __init__(self, group_cost_flops: float | None = None) -> None:
        """``group_cost_flops``: the cost of one more rank group (see ``groups``); None: the
        device's entry of ``GROUP_COST_FLOPS``. 0 gives every rank bucket its own group, ``inf``
        one group for all."""
        self.segments: tuple[Segment, ...] = ()
        self.num_rows = 0
        self.group_cost_flops = group_cost_flops
        self._plans: dict[tuple, _Plan] = {}  # layers with the same adapters share a plan
        self._groups: dict[tuple, tuple[int, ...]] = {}

    def set(self, segments: Iterable[Segment | tuple]) -> None:
        """Route the next forward passes; segments must tile ``[0, num_rows)`` in order."""
        parsed = tuple(Segment(*s) for s in segments)
        pos = 0
        for seg in parsed:
            if seg.start != pos or seg.stop <= seg.start:
                raise ValueError(
                    f"segments: expected contiguous non-empty row ranges from 0, got {list(parsed)}"
                )
            pos = seg.stop
        self.segments = parsed
        self.num_rows = pos
        self._plans = {}
        self._groups = {}

    def plan(
        self,
        active: tuple[int, ...],
        scalings: tuple[float, ...],
        ranks: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> _Plan:
        """The block layout for the segments ``active`` (indices into ``segments``) whose
        adapters have ``scalings`` and ``ranks``, cached."""
        key = (active, scalings, ranks, dtype, device)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(active, scalings, ranks, dtype, device)
        return plan

    def groups(self, plan: _Plan, tokens_per_row: int, width: int, device: torch.device) -> tuple[int, ...]:
        """Blocks per group of ``plan`` in a layer of ``width`` = in + out features, cached.

        One group pads its adapters to its largest rank (more FLOPs); each more group costs a
        few more small ops. A block's LoRA FLOPs per rank unit, forward and backward, are
        ``6 * rows * tokens * width``; ``cheapest_groups`` weighs them against the group cost.
        """
        cost = self.group_cost_flops
        if cost is None:
            cost = GROUP_COST_FLOPS.get(device.type, GROUP_COST_FLOPS["cuda"])
        key = (plan.bucket_blocks, plan.bucket_ranks, plan.length * tokens_per_row, width, cost)
        groups = self._groups.get(key)
        if groups is None:
            block_flops = 6.0 * plan.length * tokens_per_row * width
            groups = self._groups[key] = cheapest_groups(plan.bucket_blocks, plan.bucket_ranks, block_flops, cost)
        return groups

    def _make_plan(
        self,
        active: tuple[int, ...],
        scalings: tuple[float, ...],
        ranks: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> _Plan:
        segments = [self.segments[i] for i in active]
        # Blocks of the mean segment length: equal segments stay whole and unpadded, and a
        # long segment is split rather than padding every other one to its length.
        length = -(-sum(seg.stop - seg.start for seg in segments) // len(segments))
        by_bucket = sorted(range(len(active)), key=lambda j: rank_bucket(ranks[j]))  # stable
        blocks, rows, real, scale = [], [], [], []
        bucket_blocks: dict[int, int] = {}  # in ascending bucket order
        bucket_ranks: dict[int, int] = {}
        for j in by_bucket:
            i, seg, scaling = active[j], segments[j], scalings[j]
            for start in range(seg.start, seg.stop, length):
                stop = min(start + length, seg.stop)
                blocks.append(i)
                bucket = rank_bucket(ranks[j])
                bucket_blocks[bucket] = bucket_blocks.get(bucket, 0) + 1
                bucket_ranks[bucket] = max(bucket_ranks.get(bucket, 0), ranks[j])
                scale.append(scaling)
                # Padding reads (and, with a zero delta, writes) the block's first row.
                rows.extend([*range(start, stop), *[start] * (length - (stop - start))])
                real.extend([1.0] * (stop - start) + [0.0] * (length - (stop - start)))
        padded = 0.0 in real
        in_order = not padded and rows == list(range(self.num_rows))
        return _Plan(
            blocks=tuple(blocks),
            bucket_blocks=tuple(bucket_blocks.values()),
            bucket_ranks=tuple(bucket_ranks.values()),
            length=length,
            row_index=None if in_order else torch.tensor(rows, device=device),
            mask=torch.tensor(real, dtype=dtype, device=device) if padded else None,
            scale=torch.tensor(scale, dtype=dtype, device=device).view(-1, 1, 1),
        )


@dataclass
class LoraWeights:
    """One adapter in one layer: ``delta(x) = (x @ A.T @ B.T) * scaling``, A [r, in], B [out, r]."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float


class LoraLinear(nn.Module):
    """An ``nn.Linear`` (frozen) plus any number of LoRA adapters, routed by batch rows.

    Semantics, for ``x`` of shape [rows, ..., in] and the current routing::

        y = base(x)
        for seg in routing.segments:
            w = adapters.get(seg.adapter)          # None, or an adapter this layer lacks: no delta
            if w is not None:
                for row in range(seg.start, seg.stop):
                    y[row] += (x[row].float() @ w.A.T @ w.B.T * w.scaling).to(y.dtype)

    With one adapter segment the delta is computed for its rows alone. With several (of one
    dtype), the rows are gathered into equal blocks sorted by rank bucket (see ``_Plan`` and
    ``rank_bucket``), and the buckets into groups by cost (``LoraRouting.groups``: padding a
    rank-4 adapter to rank 32 against more small ops); per group, A and B are zero-padded to
    the group's largest rank and stacked, and two ``bmm`` compute the group's deltas; zero
    padding adds exact zeros, and gradients reach only the real rows and the real slices of A
    and B. This avoids a per-segment row slice, whose backward writes a zero tensor of the
    whole batch.
    Adapters in one batch may have different ranks and target sets.
    Weights are kept in a plain dict, not as registered parameters: adapter ids are arbitrary
    strings, and adapters must not appear in the base model's ``parameters()`` or ``state_dict()``.
    """

    def __init__(self, base: nn.Linear, routing: LoraRouting, kind: LayerKind) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.kind: LayerKind = kind
        self.adapters: dict[str, LoraWeights] = {}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        segments = self.routing.segments
        active = tuple(i for i, seg in enumerate(segments) if seg.adapter in self.adapters)
        if not active:
            return y
        if x.shape[0] != self.routing.num_rows:
            raise RuntimeError(
                f"LoRA routing covers {self.routing.num_rows} rows but the layer got a tensor of "
                f"shape {tuple(x.shape)}: this architecture does not keep the batch in dim 0"
            )
        weights = [self.adapters[segments[i].adapter] for i in active]  # type: ignore[index]
        if len(active) == 1 or len({w.A.dtype for w in weights}) > 1:
            return self._looped(x, y)
        return self._batched(x, y, active, weights)

    def _weights(self, seg: Segment, w: LoraWeights) -> tuple[torch.Tensor, torch.Tensor]:
        return (w.A, w.B) if seg.requires_grad else (w.A.detach(), w.B.detach())

    def _looped(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` plus the delta, one segment at a time (the reference for ``_batched``)."""
        pieces = []
        for seg in self.routing.segments:
            part = y[seg.start : seg.stop]
            w = self.adapters.get(seg.adapter) if seg.adapter is not None else None
            if w is not None:
                A, B = self._weights(seg, w)
                delta = F.linear(F.linear(x[seg.start : seg.stop].to(A.dtype), A), B)  # x @ A.T @ B.T
                part = part + (delta * w.scaling).to(part.dtype)
            pieces.append(part)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _batched(
        self, x: torch.Tensor, y: torch.Tensor, active: tuple[int, ...], weights: list[LoraWeights]
    ) -> torch.Tensor:
        """``y`` plus the delta of the segments ``active`` (all with ``weights`` of one dtype)."""
        dtype = weights[0].A.dtype
        ranks = tuple(w.A.shape[0] for w in weights)
        plan = self.routing.plan(active, tuple(w.scaling for w in weights), ranks, dtype, x.device)
        pairs = [self._weights(self.routing.segments[i], w) for i, w in zip(active, weights, strict=True)]
        by_segment = dict(zip(active, pairs, strict=True))
        x = x.to(dtype)
        if plan.row_index is not None:
            x = x.index_select(0, plan.row_index)
        if plan.mask is not None:  # zero padding rows: their delta is exactly zero
            x = x * plan.mask.view(-1, *[1] * (x.dim() - 1))
        xs = x.reshape(len(plan.blocks), -1, x.shape[-1])  # [blocks, length * tokens, in]
        groups = self.routing.groups(plan, xs.shape[1] // plan.length, self.in_features + self.out_features, x.device)
        # split, not slices: its backward is one cat, a slice's writes a zero tensor of all of xs
        parts = xs.split(groups) if len(groups) > 1 else (xs,)
        deltas, first = [], 0
        for xs_group in parts:
            blocks = plan.blocks[first : first + xs_group.shape[0]]
            first += len(blocks)
            deltas.append(_group_delta(xs_group, [by_segment[i] for i in blocks]))
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas)
        delta = (delta * plan.scale).to(y.dtype)
        if plan.row_index is None:
            return y + delta.reshape(y.shape)
        return y.index_add(0, plan.row_index, delta.reshape(-1, *y.shape[1:]))


def _group_delta(xs: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``xs[k] @ A_k.T @ B_k.T`` for each block k, ``pairs[k] = (A_k, B_k)``, as one tensor.

    One cat each for all blocks, zero rows up to the largest rank (no pad per adapter; the
    backward of a cat only takes views): A [blocks, rank, in] and B.T [blocks, rank, out].
    """
    rank = max(A.shape[0] for A, _ in pairs)
    A = _zero_padded_cat([A for A, _ in pairs], rank)
    B_t = _zero_padded_cat([B.t() for _, B in pairs], rank)
    return torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B_t)


def _zero_padded_cat(matrices: list[torch.Tensor], rows: int) -> torch.Tensor:
    """``matrices`` [r_i, n] each, with zero rows up to ``rows``, as one [len, rows, n] tensor."""
    first = matrices[0]
    parts: list[torch.Tensor] = []
    for m in matrices:
        parts.append(m)
        if m.shape[0] < rows:
            parts.append(first.new_zeros(rows - m.shape[0], m.shape[1]))  # a constant: no gradient
    return torch.cat(parts).view(len(matrices), rows, first.shape[1])


def _classify(path: str, is_unembed: bool) -> LayerKind | None:
    if is_unembed:
        return "unembed"
    parts = set(path.split("."))
    if parts & _ATTN_NAMES:
        return "attn"
    if parts & _MLP_NAMES:
        return "mlp"
    return None


def attach_lora_layers(model: nn.Module, routing: LoraRouting) -> dict[str, LoraLinear]:
    """Wrap the attention, MLP and output-embedding linears of ``model`` in place.

    Returns the wrappers by their original module path (e.g. ``model.layers.0.mlp.up_proj``,
    ``lm_head``), which is also the path PEFT uses. Linears that are neither attention, MLP
    nor the output embedding are left alone. Tied embeddings keep working: the wrapped lm_head
    still uses the shared weight and the LoRA delta is added to its output.
    """
    unembed = model.get_output_embeddings()  # type: ignore[operator]
    found: list[tuple[str, nn.Linear, LayerKind]] = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kind = _classify(path, module is unembed)
            if kind is not None:
                found.append((path, module, kind))
    layers: dict[str, LoraLinear] = {}
    for path, module, kind in found:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapper = LoraLinear(module, routing, kind)
        setattr(parent, leaf, wrapper)
        layers[path] = wrapper
    return layers


def target_paths(layers: dict[str, LoraLinear], config: LoraConfig) -> list[str]:
    """The sorted module paths that an adapter with ``config`` trains."""
    wanted = {"attn": config.train_attn, "mlp": config.train_mlp, "unembed": config.train_unembed}
    return sorted(path for path, layer in layers.items() if wanted[layer.kind])


def init_lora_weights(
    layers: dict[str, LoraLinear], config: LoraConfig, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fresh (A, B) per target path, deterministic in ``seed``, as fp32 CPU tensors.

    A is kaiming-uniform with ``a=sqrt(5)`` (as peft and ``nn.Linear`` do) and B is zero, so a
    new adapter leaves the model unchanged. Modules are visited in sorted path order with one
    CPU generator, so the result does not depend on the device.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for path in target_paths(layers, config):
        layer = layers[path]
        A = torch.empty(config.rank, layer.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        weights[path] = (A, torch.zeros(layer.out_features, config.rank))
    return weights
