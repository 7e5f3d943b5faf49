"""``--workers local`` and ``ray``: a base model's trainer runs as a group of worker processes.

``GroupEngine`` is the scheduler's engine for such a model: training calls go to the group
(every rank, SPMD), sampling stays in the server process on a torch ``ModelEngine`` of its own
that loads each published adapter version from the PEFT folder the group writes (a new folder
per sampler id, so that no sampler can serve a stale version). Like every engine it is driven
by the model's one compute thread.

When a rank dies, the call in flight fails with a retryable ``WorkerDied`` (503) naming it, and
the next call starts a new group; runs whose adapters were in the lost group are reloaded by
``Runs`` from their last ``save_state``, as after a server restart (docs/scaling.md).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

from tinker.types import AdamParams, ForwardBackwardOutput, LoraConfig, SampleResponse, SamplingParams
from tinker_backend.engine.protocol import Engine, FwdBwdItem, StepSampler
from tinker_backend.errors import ServiceError
from tinker_backend.workers.group import GroupSpec, TrainerGroup, WorkerDied

logger = logging.getLogger("tinker_backend.workers")


class Group(Protocol):
    """A started trainer group: ``TrainerGroup`` (local processes) or ``RayTrainerGroup``."""

    vocab_size: int
    max_context_length: int

    def call(self, method: str, *args: Any) -> Any: ...

    def alive(self) -> bool: ...

    def pids(self) -> list[int]: ...

    def stop(self) -> None: ...


class GroupEngine:
    """The :class:`~tinker_backend.engine.protocol.Engine` of a model trained by a group."""

    def __init__(
        self,
        spec: GroupSpec,
        make_sampler_engine: Callable[[], Engine],
        publish_dir: Path,
        *,
        placement: str = "local",
        start_group: Callable[[GroupSpec], Group] = TrainerGroup,
    ) -> None:
        """``make_sampler_engine`` builds the in-server sampling engine; ``publish_dir`` is where
        the group writes the adapters it publishes for sampling; ``start_group`` starts a group
        (``TrainerGroup``: local processes; ``ray_group.RayTrainerGroup``: Ray actors)."""
        self.spec = spec
        self.placement = placement
        self.restarts = 0
        self._start_group = start_group
        self._group: Group | None = start_group(spec)
        self.vocab_size = self._group.vocab_size
        self.max_context_length = self._group.max_context_length
        self.sampling = make_sampler_engine()  # now, on the compute thread: sampling starts on the event loop
        self._publish_dir = publish_dir
        shutil.rmtree(publish_dir, ignore_errors=True)  # versions of an earlier server: never reused
        publish_dir.mkdir(parents=True)
        self._adapters: set[str] = set()  # adapter ids in the current group
        self._lost: ServiceError | None = None

    # -- the group ----------------------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> Any:
        if self._group is None:  # lost (its error was answered): a new group
            self._restart()
        assert self._group is not None
        try:  # a rank that died while the group was idle fails this call, naming it
            return self._group.call(method, *args)
        except WorkerDied as e:
            self._group = None
            self._adapters.clear()  # the adapters died with the group
            self._lost = ServiceError(503, f"{e} (retryable)")
            raise self._lost from e

    def take_lost(self) -> ServiceError | None:
        """The error of a group lost since the last call (then None): its runs must be reloaded."""
        lost, self._lost = self._lost, None
        return lost

    def _restart(self) -> None:
        self.restarts += 1
        logger.warning("starting trainer group of %s again (restart %d)", self.spec.model_name, self.restarts)
        self._adapters.clear()
        self._group = self._start_group(self.spec)

    def health(self) -> dict[str, Any]:
        """The group's state for ``/api/v1/healthz``: ranks, their pids, alive or not, restarts."""
        group = self._group
        return {
            "placement": self.placement,
            "trainer_ranks": self.spec.ranks,
            "alive": group is not None and group.alive(),
            "pids": group.pids() if group is not None else [],
            "restarts": self.restarts,
        }

    def stats(self) -> dict[str, Any]:
        """For metrics and the console: the in-server sampler's decode counts and the group's
        health. Adapter slots live in the ranks, which report none, so there are no tiers here."""
        sampling_stats = getattr(self.sampling, "stats", None)
        sampled = sampling_stats() if callable(sampling_stats) else {}
        decode = {k: sampled[k] for k in ("decode_steps", "decoded_rows") if k in sampled}
        return {**decode, "workers": self.health()}

    # -- training -----------------------------------------------------------------------------

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self._adapters

    def create_adapter(self, adapter_id: str, config: LoraConfig) -> LoraConfig:
        config = self._call("create_adapter", adapter_id, config)
        self._adapters.add(adapter_id)
        return config

    def remove_adapter(self, adapter_id: str) -> None:
        self._call("remove_adapter", adapter_id)
        self._adapters.discard(adapter_id)

    def forward_backward_many(self, items: list[FwdBwdItem]) -> list[ForwardBackwardOutput | Exception]:
        return self._call("forward_backward_many", items)

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]:
        return self._call("optim_step", adapter_id, params)

    def save_state(self, adapter_id: str, directory: Path, include_optimizer: bool = True) -> None:
        self._call("save_state", adapter_id, directory, include_optimizer)

    def save_sampler_weights(self, adapter_id: str, directory: Path) -> None:
        self._call("save_sampler_weights", adapter_id, directory)

    def load_state(self, adapter_id: str, directory: Path, include_optimizer: bool) -> LoraConfig:
        config = self._call("load_state", adapter_id, directory, include_optimizer)
        self._adapters.add(adapter_id)
        return config

    # -- sampling (in the server process) ---------------------------------------------------------

    @property
    def sampler(self) -> StepSampler:
        return self.sampling.sampler

    def snapshot_sampler(self, adapter_id: str, sampler_id: str) -> None:
        """The group writes the adapter to a new folder; the sampling engine loads it from there."""
        directory = self._publish_dir / _safe(sampler_id)
        self._call("save_sampler_weights", adapter_id, directory)
        try:
            self.sampling.load_sampler(sampler_id, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)  # loaded into memory: the folder is spent

    def load_sampler(self, sampler_id: str, directory: Path) -> None:
        self.sampling.load_sampler(sampler_id, directory)

    def has_sampler(self, sampler_id: str) -> bool:
        return self.sampling.has_sampler(sampler_id)

    def remove_sampler(self, sampler_id: str) -> None:
        self.sampling.remove_sampler(sampler_id)

    def submit_sample(
        self,
        sampler_id: str | None,
        prompt: list[int],
        num_samples: int,
        params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> Future[SampleResponse]:
        return self.sampling.submit_sample(
            sampler_id, prompt, num_samples, params, include_prompt_logprobs, topk_prompt_logprobs
        )

    def close(self) -> None:
        if self._group is not None:
            self._group.stop()
            self._group = None
        self.sampling.close()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
