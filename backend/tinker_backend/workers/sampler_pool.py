"""The sampling side of a base model placed on workers: ``replicas`` sampler worker processes.

``SamplerPool`` is what ``GroupEngine`` hands sampling to. Each published adapter version has
its own PEFT folder (a new one per sampler id, so no replica can ever serve a stale version)
that stays until the sampler is removed; a replica loads a version from it when it first needs
it. Each request goes to a replica chosen by ``routing.choose_replica`` (adapter affinity with
load balance), so a request never waits for the model's compute thread: sampling overlaps
training.

A replica that dies fails its requests in flight with a retryable 503 naming it (see
``sampler_worker``); the pool starts it again in the background and meanwhile routes to the
others. The new process holds no adapter: it loads each again from its folder on first use.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinker.types import SampleResponse, SamplingParams
from tinker.validation import check_sample_for_model
from tinker_backend.errors import ServiceError
from tinker_backend.workers.routing import DEFAULT_MAX_IN_FLIGHT, ReplicaLoad, choose_replica
from tinker_backend.workers.sampler_worker import SamplerProcess, SamplerSpec, worker_name

logger = logging.getLogger("tinker_backend.workers")

# Seconds to wait before starting a dead replica again after a failed start.
_RESTART_BACKOFF_S = 5.0
# A publish waits this long for its first replica to load the version (a small PEFT folder).
_LOAD_TIMEOUT_S = 120.0

StartReplica = Callable[[SamplerSpec, str, Callable[[Any, str], None]], Any]


@dataclass
class _Replica:
    index: int
    name: str
    process: Any = None  # a started SamplerProcess; None while (re)starting
    adapters: set[str] = field(default_factory=set)
    in_flight: set[Future[Any]] = field(default_factory=set)
    restarts: int = 0
    requests: int = 0  # sample requests routed here
    loads: int = 0  # adapter versions loaded here (eagerly or by a request)

    def load(self) -> ReplicaLoad:
        alive = self.process is not None and self.process.alive()
        return ReplicaLoad(alive, len(self.in_flight), frozenset(self.adapters))


class _NoSteps:
    """The ``StepSampler`` the scheduler sees: never any work on the compute thread."""

    def has_work(self) -> bool:
        return False

    def step(self) -> bool:
        return False

    def close(self) -> None:
        """The pool's owner closes the workers."""


class SamplerPool:
    """``replicas`` sampler workers of one base model, with adapter-affinity routing."""

    def __init__(self, spec: SamplerSpec, replicas: int, publish_dir: Path, *,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, start: StartReplica = SamplerProcess) -> None:
        """Start the workers (in parallel) and wait for them; ``publish_dir`` is emptied: the
        versions of an earlier server are never reused."""
        self.spec, self.max_in_flight = spec, max_in_flight
        self.publish_dir = publish_dir
        shutil.rmtree(publish_dir, ignore_errors=True)
        publish_dir.mkdir(parents=True)
        self._start = start
        self._lock = threading.Lock()
        self._closed = False
        self._folders: dict[str, Path] = {}  # sampler id -> the folder its version loads from
        self._replicas = [_Replica(i, worker_name(spec.model_name, i)) for i in range(replicas)]
        self.sampler = _NoSteps()
        with ThreadPoolExecutor(max_workers=replicas) as pool:
            processes = list(pool.map(self._start_process, self._replicas))
        for replica, process in zip(self._replicas, processes, strict=True):
            replica.process = process
        self.vocab_size: int = processes[0].vocab_size
        self.max_context_length: int = processes[0].max_context_length

    def _start_process(self, replica: _Replica) -> Any:
        return self._start(self.spec, replica.name, lambda process, why: self._died(replica, process))

    # -- adapter versions -----------------------------------------------------------------------

    def publish(self, sampler_id: str, directory: Path) -> None:
        """Serve the PEFT folder ``directory`` as ``sampler_id``; the least loaded replica loads it
        now, so that a bad adapter fails here and the first request finds it loaded."""
        if sampler_id in self._folders:
            raise ValueError(f"sampler_id: {sampler_id!r} already exists")
        with self._lock:
            index = choose_replica(None, [r.load() for r in self._replicas], self.max_in_flight)
            replica = None if index is None else self._replicas[index]
            process = None if replica is None else replica.process
            if replica is not None:
                replica.adapters.add(sampler_id)
                replica.loads += 1
        self._folders[sampler_id] = directory
        if replica is None or process is None:
            return  # no replica alive now: the first request loads it
        try:
            process.send("load", sampler_id, str(directory)).result(timeout=_LOAD_TIMEOUT_S)
        except ServiceError:  # the replica died meanwhile: a request will load it elsewhere
            replica.adapters.discard(sampler_id)
        except Exception:
            replica.adapters.discard(sampler_id)
            del self._folders[sampler_id]
            raise

    def has_sampler(self, sampler_id: str) -> bool:
        return sampler_id in self._folders

    def remove_sampler(self, sampler_id: str) -> None:
        """Unload ``sampler_id`` from every replica; its folder goes if the pool wrote it."""
        directory = self._folders.pop(sampler_id, None)
        if directory is None:
            raise KeyError(f"sampler_id: no sampler {sampler_id!r} on {self.spec.model_name}")
        with self._lock:
            holders = [r.process for r in self._replicas if sampler_id in r.adapters and r.process is not None]
            for replica in self._replicas:
                replica.adapters.discard(sampler_id)
        for process in holders:
            process.send("remove", sampler_id)  # in order before any later load on that pipe
        if directory.parent == self.publish_dir:
            shutil.rmtree(directory, ignore_errors=True)

    # -- sampling -------------------------------------------------------------------------------

    def submit_sample(
        self,
        sampler_id: str | None,
        prompt: list[int],
        num_samples: int,
        params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> Future[SampleResponse]:
        """Route a sample request to a replica; thread-safe, returns at once."""
        directory = None
        if sampler_id is not None:
            directory = self._folders.get(sampler_id)
            if directory is None:
                raise KeyError(f"sampler_id: no sampler {sampler_id!r} on {self.spec.model_name}")
        check_sample_for_model(prompt, params, self.vocab_size, self.max_context_length)
        with self._lock:
            index = choose_replica(sampler_id, [r.load() for r in self._replicas], self.max_in_flight)
            if index is None:
                raise ServiceError(503, f"no sampler worker of {self.spec.model_name!r} is alive (they are "
                                        "restarting; retryable: send the request again)")
            replica = self._replicas[index]
            if sampler_id is not None and sampler_id not in replica.adapters:
                replica.adapters.add(sampler_id)
                replica.loads += 1
            replica.requests += 1
            future: Future[SampleResponse] = replica.process.send(
                "sample", sampler_id, str(directory), prompt, num_samples, params,
                include_prompt_logprobs, topk_prompt_logprobs)
            replica.in_flight.add(future)
        future.add_done_callback(lambda f: self._done(replica, f))
        return future

    def _done(self, replica: _Replica, future: Future[Any]) -> None:
        with self._lock:
            replica.in_flight.discard(future)

    # -- faults ---------------------------------------------------------------------------------

    def _died(self, replica: _Replica, process: Any) -> None:
        """Called by a dead worker's reader thread: forget what it held and start it again."""
        with self._lock:
            if replica.process is not process or self._closed:
                return
            replica.process = None
            replica.adapters.clear()
            replica.in_flight.clear()
        threading.Thread(target=self._restart, args=(replica,), name=f"restart-{replica.name}", daemon=True).start()

    def _restart(self, replica: _Replica) -> None:
        while not self._closed:
            logger.warning("starting %s again (restart %d)", replica.name, replica.restarts + 1)
            try:
                process = self._start_process(replica)
            except Exception:
                if self._closed:  # the pool closed while it started (Ray may be shut down already)
                    return
                logger.exception("%s did not start; trying again in %.0f s", replica.name, _RESTART_BACKOFF_S)
                time.sleep(_RESTART_BACKOFF_S)
                continue
            with self._lock:
                if not self._closed:
                    replica.process = process
                    replica.restarts += 1
                    return
            process.close()  # the pool closed while it started

    # -- state ----------------------------------------------------------------------------------

    def health(self) -> list[dict[str, Any]]:
        """Each replica for ``/api/v1/healthz``: pid, alive, restarts, adapters held, in flight,
        the requests and adapter loads routed to it, its sampler kind and (vllm) the versions its
        torch sampler serves."""
        with self._lock:
            return [
                {
                    "name": r.name,
                    "pid": None if r.process is None else r.process.pid,
                    "alive": r.process is not None and r.process.alive(),
                    "restarts": r.restarts,
                    "adapters": sorted(r.adapters),
                    "in_flight": len(r.in_flight),
                    "requests": r.requests,
                    "loads": r.loads,
                    "sampler": self.spec.sampler,
                    # vllm: the versions its torch sampler serves instead (a LoRA on lm_head)
                    "torch_served": (getattr(r.process, "stats", None) or {}).get("torch_served", []),
                }
                for r in self._replicas
            ]

    def stats(self) -> dict[str, Any]:
        """The replicas' decode counts, summed (each reports them with every answer)."""
        totals = {"decode_steps": 0, "decoded_rows": 0}
        for replica in self._replicas:
            stats = getattr(replica.process, "stats", None) or {}
            for key in totals:
                totals[key] += stats.get(key, 0)
        return totals

    def close(self) -> None:
        with self._lock:
            self._closed = True
            processes = [r.process for r in self._replicas if r.process is not None]
        for process in processes:
            process.close()
