"""``--workers local`` and ``ray``: a base model's trainer runs as a group of worker processes.

``GroupEngine`` is the scheduler's engine for such a model: training calls go to the group
(every rank, SPMD), sampling goes to the model's ``SamplerPool`` of sampler worker processes,
which load each published adapter version from the PEFT folder the group writes (a new folder
per sampler id, so that no sampler can serve a stale version). Training calls are driven by the
model's one compute thread; sample requests go straight to the pool, so they never wait for it.

When a rank dies, the call in flight fails with a retryable ``WorkerDied`` (503) naming it; a
rank that dies while the group is idle is found by a supervisor thread within a second, and the
next request fails the same way. Either way the supervisor starts a new group at once; runs
whose adapters were in the lost group are reloaded by ``Runs`` from their last ``save_state``,
as after a server restart (docs/scaling.md).
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, cast

from tinker.types import AdamParams, ForwardBackwardOutput, LoraConfig, SampleResponse, SamplingParams
from tinker_backend.engine.protocol import FwdBwdItem, StepSampler
from tinker_backend.errors import ServiceError
from tinker_backend.workers.group import GroupSpec, TrainerGroup, WorkerDied
from tinker_backend.workers.sampler_pool import SamplerPool

logger = logging.getLogger("tinker_backend.workers")

_SUPERVISE_S = 1.0  # how often the supervisor looks at the group's processes


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
        make_sampling: Callable[[], SamplerPool],
        *,
        placement: str = "local",
        start_group: Callable[[GroupSpec], Group] = TrainerGroup,
        supervise: bool = True,
    ) -> None:
        """``make_sampling`` starts the model's sampler workers (whose ``publish_dir`` is where the
        group writes the adapter versions it publishes); ``start_group`` starts a group
        (``TrainerGroup``: local processes; ``ray_group.RayTrainerGroup``: Ray actors);
        ``supervise=False`` starts no supervisor: a dead group then restarts at its next request."""
        self.spec = spec
        self.placement = placement
        self.restarts = 0
        self._start_group = start_group
        self._group: Group | None
        self._group, self.sampling = _start_both(lambda: start_group(spec), make_sampling)
        self.vocab_size = self._group.vocab_size
        self.max_context_length = self._group.max_context_length
        self._adapters: set[str] = set()  # adapter ids in the current group
        self._lost: ServiceError | None = None
        self._lock = threading.Condition()  # the group: calls (compute thread) and the supervisor
        self._starting = False  # the supervisor is starting a new group (outside the lock)
        self._closed = threading.Event()
        if supervise:
            threading.Thread(target=self._supervise, name=f"supervise-{spec.model_name[-24:]}", daemon=True).start()

    # -- the group ----------------------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> Any:
        lost = self._lost
        if lost is not None:  # the supervisor found the group dead: this request fails at once
            raise lost
        with self._lock:
            self._lock.wait_for(lambda: not self._starting)
            return self._call_locked(method, *args)

    def _call_locked(self, method: str, *args: Any) -> Any:
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

    def _supervise(self) -> None:
        """Every second: a group with a dead rank is lost (its runs' next request fails at once
        with the 503 naming the rank, as for a death mid-call) and a new group is started, so
        that the requests after it need not wait for the start."""
        while not self._closed.wait(_SUPERVISE_S):
            group = self._group
            if group is not None and group.alive():
                continue
            with self._lock:
                if self._closed.is_set() or (self._group is not None and self._group.alive()):
                    continue
                if self._group is not None:
                    try:
                        self._call_locked("has_adapter", "")  # raises naming the dead rank, sets _lost
                    except ServiceError:
                        pass
                self._starting = True
            self._start_for_supervisor()

    def _start_for_supervisor(self) -> None:
        """Start a group outside the lock (calls fail fast meanwhile) and install it."""
        logger.warning("starting trainer group of %s again (restart %d)", self.spec.model_name, self.restarts + 1)
        try:
            group: Group | None = self._start_group(self.spec)
        except Exception:  # tried again on the next tick (or by the next request)
            logger.exception("starting trainer group of %s failed", self.spec.model_name)
            group = None
        with self._lock:
            self._starting = False
            if group is not None and self._group is None and not self._closed.is_set():
                self._group, group = group, None
                self.restarts += 1
                self._adapters.clear()
            self._lock.notify_all()
        if group is not None:  # closed meanwhile
            group.stop()

    def _restart(self) -> None:
        self.restarts += 1
        logger.warning("starting trainer group of %s again (restart %d)", self.spec.model_name, self.restarts)
        self._adapters.clear()
        self._group = self._start_group(self.spec)

    def health(self) -> dict[str, Any]:
        """For ``/api/v1/healthz``: the group's ranks, their pids, alive or not, restarts; and
        each sampler replica (``SamplerPool.health``)."""
        group = self._group
        return {
            "placement": self.placement,
            "trainer_ranks": self.spec.ranks,
            "alive": group is not None and group.alive(),
            "pids": group.pids() if group is not None else [],
            "restarts": self.restarts,
            "samplers": self.sampling.health(),
        }

    def stats(self) -> dict[str, Any]:
        """For metrics and the console: the sampler workers' decode counts and the group's
        health. Adapter slots live in the ranks, which report none, so there are no tiers here."""
        return {**self.sampling.stats(), "workers": self.health()}

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

    # -- sampling (in the sampler workers) --------------------------------------------------------

    @property
    def sampler(self) -> StepSampler:
        return self.sampling.sampler  # never any work on the compute thread

    def snapshot_sampler(self, adapter_id: str, sampler_id: str) -> None:
        """The group writes the adapter to a new folder, from which the sampler workers load it."""
        directory = self.sampling.publish_dir / _safe(sampler_id)
        self._call("save_sampler_weights", adapter_id, directory)
        try:
            self.sampling.publish(sampler_id, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def load_sampler(self, sampler_id: str, directory: Path) -> None:
        self.sampling.publish(sampler_id, directory)

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
        self._closed.set()
        with self._lock:
            if self._group is not None:
                self._group.stop()
                self._group = None
        self.sampling.close()


def _start_both(start_group: Callable[[], Group], start_sampling: Callable[[], SamplerPool]) -> tuple[Group, SamplerPool]:
    """Start the trainer group and the sampler workers side by side (each takes seconds to
    load the model); if one fails, stop the other."""
    with ThreadPoolExecutor(max_workers=2) as pool:  # leaving it waits for both
        group, sampling = pool.submit(start_group), pool.submit(start_sampling)
    if group.exception() is None and sampling.exception() is None:
        return group.result(), sampling.result()
    if group.exception() is None:
        group.result().stop()
    if sampling.exception() is None:
        sampling.result().close()
    raise cast(BaseException, group.exception() or sampling.exception())


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
