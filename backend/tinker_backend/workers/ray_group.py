"""``--workers ray``: a trainer group whose ranks are Ray actors (Ray Core), on a cluster or on a
local Ray the server starts.

``RayTrainerGroup`` has ``TrainerGroup``'s interface (``call``, ``alive``, ``pids``, ``stop``),
so ``GroupEngine`` drives either. Each rank is an actor with one CPU (and one GPU when the
group's devices are CUDA: Ray then shows the actor its GPU as ``cuda:0``); the ranks form a
``torch.distributed`` group over TCP at rank 0's node address. An actor that dies makes its
pending call raise ``RayActorError`` at once; the group then stops its other actors (they
would wait forever in a collective) and raises ``WorkerDied`` naming the rank and its pid.
Ray is imported only by the ``ray_*`` modules (the optional extra ``.[ray]``); the server joins
or starts Ray through ``ray_driver``.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import ray

from tinker_backend.workers.group import GroupSpec, WorkerDied, build_rank_engine, picklable_error, run_call

logger = logging.getLogger("tinker_backend.workers")


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
