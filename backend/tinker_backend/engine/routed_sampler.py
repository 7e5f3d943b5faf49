"""The ``vllm`` sampler mode: vLLM for every adapter it can serve, the torch sampler for the rest.

vLLM 0.32 cannot apply a LoRA on the output embedding (``lm_head``, ``train_unembed=True``, the
default of the Tinker SDK and cookbook; see ``vllm_sampler``). Refusing those adapters would
break every cookbook recipe, and dropping their lm_head delta would sample from a different
model than the one trained. So ``RoutedSampler`` holds both samplers and picks one per adapter
when it is published: vLLM unless it says it cannot serve the adapter, else the continuous
batching torch sampler, which runs on the engine's own weights and LoRA layers (lm_head
included) and is stepped by the scheduler's compute thread. Both implement the same
``SamplingParams`` semantics, so a client cannot tell which one answered, but for speed.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Protocol

from tinker.types import SampleResponse

from ..checkpoints import AdapterCheckpoint
from .torch_sampler import Sampler, SampleRequest

__all__ = ["RoutedSampler"]

logger = logging.getLogger("tinker_backend.sampler")


class PickySampler(Sampler, Protocol):
    """A sampler that can say, before ``add_adapter``, that it cannot serve an adapter."""

    def unsupported(self, checkpoint: AdapterCheckpoint) -> str | None:
        """Why this sampler cannot serve ``checkpoint``, or None if it can."""


class RoutedSampler:
    """Routes each adapter to ``primary`` (vLLM) or, when it cannot serve it, to ``fallback``
    (the torch sampler); implements ``Sampler``.

    Base-model requests (``sampler_id`` None) go to ``primary``. ``step`` / ``has_work`` are the
    fallback's: vLLM computes on its own thread and never needs the compute thread.
    """

    def __init__(self, primary: PickySampler, fallback: Sampler) -> None:
        self.primary = primary
        self.fallback = fallback
        # sampler_id -> the sampler serving it. Written on the compute thread, read by ``submit``
        # from any thread: single dict operations, atomic under the GIL.
        self._owners: dict[str, Sampler] = {}

    def owner(self, sampler_id: str | None) -> Sampler:
        """The sampler that serves ``sampler_id`` (None: the base model)."""
        if sampler_id is None:
            return self.primary
        owner = self._owners.get(sampler_id)
        if owner is None:
            raise KeyError(f"sampler_id: no sampler {sampler_id!r}")
        return owner

    def fallback_ids(self) -> list[str]:
        """The sampler ids the fallback (torch) serves, sorted."""
        return sorted(sampler_id for sampler_id, owner in self._owners.items() if owner is self.fallback)

    def add_adapter(self, sampler_id: str, checkpoint: AdapterCheckpoint) -> None:
        target: Sampler = self.primary
        reason = self.primary.unsupported(checkpoint)
        if reason is not None:
            logger.info("sampler %s is served by the torch sampler, not vLLM: %s", sampler_id, reason)
            target = self.fallback
        target.add_adapter(sampler_id, checkpoint)
        self._owners[sampler_id] = target

    def remove_adapter(self, sampler_id: str) -> None:
        self._owners.pop(sampler_id).remove_adapter(sampler_id)

    def submit(self, request: SampleRequest) -> Future[SampleResponse]:
        return self.owner(request.sampler_id).submit(request)

    def has_work(self) -> bool:
        return self.fallback.has_work()

    def step(self) -> bool:
        return self.fallback.step()

    def close(self) -> None:
        try:
            self.fallback.close()  # fails its requests in flight: cheap, cannot block
        finally:
            self.primary.close()
