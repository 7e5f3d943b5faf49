"""``ShardedModelEngine``: one rank of a trainer group that shards a base model with FSDP2.

Every rank of the group builds the same engine (the same base weights, the same adapters in
the same slots) and is given the same calls in the same order (SPMD). The base model's
decoder blocks and its root are sharded with ``torch.distributed.fsdp.fully_shard``; the LoRA
adapter bank is small and replicated on every rank, outside FSDP (the layers keep adapters in
plain dicts, not as parameters). A clock cycle's merged pass is split across the ranks:

    items of the cycle  ->  rank r runs its contiguous share with ``forward_backward_batch``
    results             ->  all-gathered, so every rank answers the whole cycle
    LoRA gradients      ->  all-reduced (sum: losses are sums), so every adapter is identical
    optim_step          ->  the single-process code, run by every rank on identical gradients

FSDP2 all-gathers each block's shard in the forward and again in the backward, and every rank
must issue the same collectives in the same order. So every rank runs exactly one forward per
cycle (a rank with no share runs a one-token idle row), every rank runs a backward when any
does (each rank's batch then holds a one-token row with zero loss weight, whose loss cannot
fail, so the backward runs even if the rank's own losses all failed), and the input
embeddings require grad so that every block takes part in every backward, whatever modules
the adapters of a rank's share train.
The result equals the single-process engine's up to float summation order.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tinker.types import ForwardBackwardOutput
from tinker.validation import resolve_loss_config

from .model_engine import ModelEngine
from .trainer import PreparedItem, TrainableAdapter, forward_backward_batch

__all__ = ["ShardedModelEngine", "picklable", "split_items"]


class ShardedModelEngine(ModelEngine):
    """A :class:`ModelEngine` whose base model is sharded over the default process group.

    ``torch.distributed`` must be initialised (gloo on CPU, NCCL on CUDA) before it is built;
    ``device`` is this rank's device (``cuda:<local rank>`` on GPUs). Training, checkpoints and
    adapters behave as in ``ModelEngine``; the group does not sample (samplers load the PEFT
    folders it writes), so ``submit_sample`` is refused.
    """

    def __init__(self, model_name: str, model_path: Path, device: str | None = None, **kwargs: Any) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ShardedModelEngine: torch.distributed is not initialised")
        super().__init__(model_name, model_path, device, **kwargs)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for block in _blocks(self.model):
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.model.enable_input_require_grads()  # every block in every backward (see the module docstring)

    def save_state(self, adapter_id: str, directory: Path, include_optimizer: bool = True) -> None:
        """Rank 0 writes the checkpoint (an ordinary one: the adapters are replicated, not sharded)."""
        if self.rank == 0:
            super().save_state(adapter_id, directory, include_optimizer)
        else:
            self._adapter(adapter_id)  # the same state changes as rank 0 (pending updates applied)

    def save_sampler_weights(self, adapter_id: str, directory: Path) -> None:
        """Rank 0 writes the PEFT folder."""
        if self.rank == 0:
            super().save_sampler_weights(adapter_id, directory)
        else:
            self._adapter(adapter_id)

    def submit_sample(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a sharded trainer group does not sample: publish sampler weights to a sampler")

    def _run_batch(
        self, prepared: list[PreparedItem], adapters: dict[str, TrainableAdapter]
    ) -> list[ForwardBackwardOutput | Exception]:
        """This rank's share of the pass, the others' results gathered, LoRA gradients reduced."""
        shares = split_items([sum(len(t) for t in item.tokens) for item in prepared], self.world_size)
        mine = [prepared[i] for i in shares[self.rank]]
        trained = sorted({item.key for item in prepared if item.backward})
        # Gradients accumulated before this pass are the same on every rank: set aside, so that
        # only this pass's are summed over the ranks, then added back.
        earlier = {key: [p.grad for p in adapters[key].parameters()] for key in trained}
        for key in trained:
            for p in adapters[key].parameters():
                p.grad = None
        local = list(mine)
        if trained:  # always, even beside real rows: a rank whose own losses all fail still runs the backward
            local.append(_idle_item(trained[0], True, self.device))
        elif not local:
            local.append(_idle_item(prepared[0].key, False, self.device))
        outputs = forward_backward_batch(self.model, self.routing, local, adapters, self.checkpoint_tokens)
        gathered: list[Any] = [None] * self.world_size
        mine_outputs = zip(shares[self.rank], outputs[: len(mine)], strict=True)  # not the idle row's
        dist.all_gather_object(gathered, [(i, picklable(out)) for i, out in mine_outputs])
        results: list[ForwardBackwardOutput | Exception | None] = [None] * len(prepared)
        for part in gathered:
            for i, output in part:
                results[i] = output
        if trained:
            self._reduce_grads([adapters[key] for key in trained])
        for key in trained:  # as in the single process: an adapter whose every item failed keeps its state
            failed = all(isinstance(results[i], Exception) for i, item in enumerate(prepared)
                         if item.key == key and item.backward)
            for p, grad in zip(adapters[key].parameters(), earlier[key], strict=True):
                if failed:
                    p.grad = grad
                elif grad is not None:
                    assert p.grad is not None  # _reduce_grads gave every parameter one
                    p.grad = grad + p.grad
        return [result for result in results if result is not None]  # every item has its result

    @staticmethod
    def _reduce_grads(adapters: list[TrainableAdapter]) -> None:
        """Sum the adapters' gradients over the ranks, in one flat all-reduce."""
        params = [p for adapter in adapters for p in adapter.parameters()]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for p, grad in zip(params, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            p.grad = grad


def split_items(sizes: list[int], parts: int) -> list[list[int]]:
    """Contiguous shares of items (by index) with about equal total ``sizes``, one per part.

    Item ``i`` goes to the part where the midpoint of its size range falls (ties to the lower part), so the split is the
    same on every rank and no item is cut.
    """
    total = sum(sizes) or 1
    shares: list[list[int]] = [[] for _ in range(parts)]
    start = 0
    for i, size in enumerate(sizes):
        shares[min(parts - 1, (2 * start + size - 1) * parts // (2 * total))].append(i)
        start += size
    return shares


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks, the units FSDP shards one at a time (named by
    ``transformers`` in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no decoder blocks to shard (_no_split_modules is {names or None})")
    return blocks


def _idle_item(key: str, backward: bool, device: torch.device) -> PreparedItem:
    """One token with zero loss weight: the forward (and backward) that keeps a rank in step."""
    token = torch.zeros(1, dtype=torch.long, device=device)
    inputs = {"target_tokens": token, "weights": torch.zeros(1, device=device)}
    return PreparedItem(key, [[0]], [token], [inputs], "cross_entropy", resolve_loss_config("cross_entropy", None),
                        backward)


def picklable(output: Any) -> Any:
    """``output``, or an exception that survives pickling with the same type name and message."""
    if isinstance(output, Exception):
        try:
            pickle.loads(pickle.dumps(output))
        except Exception:
            return RuntimeError(f"{type(output).__name__}: {output}")
    return output
