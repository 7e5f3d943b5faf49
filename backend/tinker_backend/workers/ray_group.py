"""``--workers ray``: a trainer group whose ranks are Ray actors (Ray Core), on a cluster or on a
local Ray the server starts.

``RayTrainerGroup`` has ``TrainerGroup``'s interface (``call``, ``alive``, ``pids``, ``stop``),
so ``GroupEngine`` drives either. Each rank is an actor with one CPU (and one GPU when the
group's devices are CUDA: Ray then shows the actor its GPU as ``cuda:0``); the ranks form a
``torch.distributed`` group over TCP at rank 0's node address. An actor that dies makes its
pending call raise ``RayActorError`` at once; the group then stops its other actors (they
would wait forever in a collective) and raises ``WorkerDied`` naming the rank and its pid.
``RaySamplerProcess`` is a sampler worker as a threaded Ray actor (``SamplerProcess``'s
interface, so ``SamplerPool`` drives either). Ray is imported only here (the optional extra
``.[ray]``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import ray

from tinker_backend.errors import ServiceError
from tinker_backend.workers.group import GroupSpec, WorkerDied, build_rank_engine, picklable_error, run_call
from tinker_backend.workers.sampler_worker import SamplerSpec, WorkerLoop

logger = logging.getLogger("tinker_backend.workers")


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at ``address``, or start a local Ray (no dashboard) when None."""
    if ray.is_initialized():
        return
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def cancel_abort_alarm() -> None:
    """Cancel the abort that Ray's SIGTERM handler arms 3 s ahead (abseil's failure handler,
    ray-project/ray#64830): stopping the groups and Ray itself takes longer than that."""
    signal.alarm(0)


def disconnect() -> None:
    """Leave Ray (stopping the local Ray that ``connect`` started, if it did)."""
    if ray.is_initialized():
        ray.shutdown()


class _RankActor:
    """One rank in its actor process: the sharded engine and the calls on it."""

    def __init__(self, rank: int, spec: GroupSpec, device: str) -> None:
        self.rank, self.spec, self.device = rank, spec, device
        self.engine: Any = None

    def address(self) -> str:
        """``host:port`` where rank 0 accepts the group's TCP rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def setup(self, init_method: str) -> tuple[str, Any]:
        try:
            self.engine = build_rank_engine(self.rank, self.spec, init_method, self.device)
        except Exception as e:
            return "error", picklable_error(e)
        info = {"pid": os.getpid(), "vocab_size": self.engine.vocab_size,
                "max_context_length": self.engine.max_context_length}
        return "ok", info

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any]:
        return run_call(self.engine, method, args, kwargs)


class RayTrainerGroup:
    """``spec.ranks`` Ray actors holding one base model sharded; ``call`` runs on all of them."""

    def __init__(self, spec: GroupSpec, *, start_timeout_s: float = 300.0) -> None:
        self.spec = spec
        gpus = 1 if spec.devices and spec.devices[0].startswith("cuda") else 0
        actor: Any = ray.remote(_RankActor).options(num_cpus=1, num_gpus=gpus, max_restarts=0)
        self._actors: list[Any] = [actor.remote(rank, spec, "cuda:0" if gpus else "cpu") for rank in range(spec.ranks)]
        self._pids: list[int] = []
        self._stopped = False
        try:
            init = "tcp://" + ray.get(self._actors[0].address.remote(), timeout=start_timeout_s)
            infos = self._gather([a.setup.remote(init) for a in self._actors], start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self._pids = [info["pid"] for info in infos]
        self.vocab_size: int = infos[0]["vocab_size"]
        self.max_context_length: int = infos[0]["max_context_length"]

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``engine.method(*args, **kwargs)`` on every rank; rank 0's answer (or its exception)."""
        return self._gather([a.call.remote(method, args, kwargs) for a in self._actors])[0]

    def _gather(self, refs: list[Any], timeout: float | None = None) -> list[Any]:
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        answers: dict[int, tuple[str, Any]] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not ready:
                self.stop()
                raise WorkerDied(f"{self.describe()}: no answer within {timeout} s; the group was stopped")
            for ref in ready:
                try:
                    answers[rank_of[ref]] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self._died(rank_of[ref], e)
        errors = [answers[r][1] for r in sorted(answers) if answers[r][0] == "error"]
        if errors:
            raise errors[0]
        return [answers[r][1] for r in sorted(answers)]

    def _died(self, rank: int, error: Exception) -> None:
        pid = self._pids[rank] if rank < len(self._pids) else "unknown"
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        message = (f"{self.describe()}: rank {rank} (pid {pid}) died (Ray actor: {cause}); "
                   "its work in flight is lost, retry it")
        logger.error(message)
        self.stop()
        raise WorkerDied(message)

    def describe(self) -> str:
        return f"trainer group of {self.spec.model_name!r} ({self.spec.ranks} Ray actors)"

    def alive(self) -> bool:
        """Not stopped, and (for actors on this machine) every actor's process still exists."""
        if self._stopped or not self._pids:
            return False
        for pid in self._pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # another node's pid number, or not ours to signal
                pass
        return True

    def pids(self) -> list[int]:
        return list(self._pids)

    def stop(self) -> None:
        """Kill the actors; idempotent."""
        self._stopped = True
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:  # already dead
                pass


class _SamplerActor:
    """A sampler worker in a threaded actor: ``WorkerLoop`` on a thread of its own; each ``call``
    waits (on one of the actor's threads) for its command's answer."""

    def __init__(self, spec: SamplerSpec) -> None:
        self.loop = WorkerLoop(spec)
        threading.Thread(target=self.loop.run, name="sampler-loop", daemon=True).start()

    def info(self) -> dict[str, Any]:
        engine = self.loop.engine
        return {"pid": os.getpid(), "vocab_size": engine.vocab_size, "max_context_length": engine.max_context_length}

    def call(self, command: str, args: tuple[Any, ...]) -> tuple[str, Any, dict[str, Any]]:
        answer: Future[tuple[str, Any]] = Future()
        self.loop.put(command, args, lambda status, value: answer.set_result((status, value)))
        status, value = answer.result()
        return status, value, self.loop.engine.stats()

    def watch(self) -> None:
        """Never returns: the server's pending call fails the moment the actor dies."""
        threading.Event().wait()


class RaySamplerProcess:
    """A sampler worker as a Ray actor (1 CPU, or 1 GPU on CUDA); ``send`` runs a command in it.

    A pending ``watch`` call raises ``RayActorError`` when the actor dies: every future in flight
    then fails with a retryable 503 naming the worker and ``on_death`` is called.
    """

    def __init__(self, spec: SamplerSpec, name: str, on_death: Callable[[RaySamplerProcess, str], None],
                 *, start_timeout_s: float = 300.0) -> None:
        self.name, self._on_death = name, on_death
        self.stats: dict[str, Any] = {}
        self.pid: int | None = None
        self._lock = threading.Lock()
        self._futures: set[Future[Any]] = set()
        self._dead = self._closing = False
        gpus = 1 if (spec.device or "").startswith("cuda") else 0
        actor: Any = ray.remote(_SamplerActor).options(num_cpus=1, num_gpus=gpus, max_restarts=0, max_concurrency=128)
        self._actor = actor.remote(spec)
        try:
            info = ray.get(self._actor.info.remote(), timeout=start_timeout_s)
        except BaseException:
            self.close()
            raise
        self.pid = info["pid"]
        self.vocab_size: int = info["vocab_size"]
        self.max_context_length: int = info["max_context_length"]
        watch = self._actor.watch.remote()
        threading.Thread(target=self._watch, args=(watch,), name=f"watch-{name}", daemon=True).start()

    def describe(self) -> str:
        return f"{self.name} (Ray actor, pid {self.pid})"

    def send(self, command: str, *args: Any) -> Future[Any]:
        """Run ``command`` in the actor; the future answers with its result or its error."""
        future: Future[Any] = Future()
        with self._lock:
            if self._dead or self._closing:
                future.set_exception(self._died_error())
                return future
            self._futures.add(future)
        self._actor.call.remote(command, args).future().add_done_callback(lambda ref: self._answer(future, ref))
        return future

    def _answer(self, future: Future[Any], ref: Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)
        if future.done():  # failed by the watcher already
            return
        try:
            status, value, self.stats = ref.result()
        except Exception:  # the actor died
            future.set_exception(self._died_error())
            return
        if status == "ok":
            future.set_result(value)
        else:
            future.set_exception(value)

    def _watch(self, ref: Any) -> None:
        try:
            ray.get(ref)
        except Exception:  # RayActorError: it died (or was killed by close)
            pass
        with self._lock:
            self._dead = True
            lost, self._futures = list(self._futures), set()
            closing = self._closing
        if closing:
            return
        error = self._died_error()
        logger.error("%s", error.message)
        for future in lost:
            if not future.done():
                future.set_exception(error)
        self._on_death(self, error.message)

    def _died_error(self) -> ServiceError:
        return ServiceError(503, f"sampler worker {self.describe()} died; its requests in flight are lost "
                                 "(retryable: send them again)")

    def alive(self) -> bool:
        return not self._dead and not self._closing

    def close(self) -> None:
        """Kill the actor; idempotent."""
        with self._lock:
            self._closing = True
        try:
            ray.kill(self._actor)
        except Exception:  # already dead
            pass
