"""``TrainerGroup``: N local processes that hold one base model sharded (FSDP2) and train as one.

The parent (the server, or a test) drives the group with plain engine calls: every call goes to
every rank in the same order (the ranks run SPMD, see ``engine.sharded``) and the answer of
rank 0 is returned. Each rank is a ``spawn``ed process with a pipe; the ranks form a
``torch.distributed`` group (gloo on CPU, NCCL on CUDA) through a file in a private directory.

A rank that dies (killed, out of memory) is noticed at once through its process sentinel: the
call in flight fails with ``WorkerDied`` naming the rank and its pid, and the group is stopped
(its other ranks would wait forever in a collective). The owner may then ``start`` a new group.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("tinker_backend.workers")


class WorkerDied(RuntimeError):
    """A worker process of a group died; its work in flight is lost (retry it on a new group)."""


@dataclass(frozen=True)
class GroupSpec:
    """What each rank loads: the base model and the ``ModelEngine`` options."""

    model_name: str
    model_path: Path
    ranks: int = 2
    devices: tuple[str, ...] = ()  # rank r's device ("cpu", "cuda:N"); default: cpu, or cuda:r with CUDA
    dtype: str | None = None  # "float32" / "bfloat16"; None: the engine's default for the device
    engine_options: dict[str, Any] = field(default_factory=dict)  # max_slots, offload_dir, ...


class TrainerGroup:
    """A started group of ``spec.ranks`` processes; ``call`` runs an engine method on all."""

    def __init__(self, spec: GroupSpec, *, start_timeout_s: float = 300.0) -> None:
        self.spec = spec
        self._context = multiprocessing.get_context("spawn")
        self._rendezvous = tempfile.TemporaryDirectory(prefix="tinker-group-")
        init_file = Path(self._rendezvous.name) / "init"
        self._conns: list[multiprocessing.connection.Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for rank in range(spec.ranks):
            parent, child = self._context.Pipe()
            process = self._context.Process(
                target=_rank_main, args=(rank, spec, str(init_file), child),
                name=f"trainer-{spec.model_name[-24:]}-rank{rank}", daemon=True,
            )
            process.start()
            child.close()
            self._conns.append(parent)
            self.processes.append(process)
        try:
            infos = self._gather(timeout=start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.vocab_size: int = infos[0]["vocab_size"]
        self.max_context_length: int = infos[0]["max_context_length"]
        self._stopping = False
        threading.Thread(target=self._watch, name=f"watch-{spec.model_name[-24:]}", daemon=True).start()

    def _watch(self) -> None:
        """Log a rank's death when it happens, even while the group is idle (its next call fails)."""
        sentinels = {process.sentinel: rank for rank, process in enumerate(self.processes)}
        [first, *_] = multiprocessing.connection.wait(list(sentinels))
        if not self._stopping:
            process = self.processes[sentinels[first]]  # type: ignore[index]
            logger.error("%s: rank %d (pid %s) died with exit code %s; the next request fails and starts a new group",
                         self.describe(), sentinels[first], process.pid, process.exitcode)  # type: ignore[index]

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``engine.method(*args, **kwargs)`` on every rank; rank 0's answer (or its exception)."""
        self._check_alive()
        for rank, conn in enumerate(self._conns):
            try:
                conn.send((method, args, kwargs))
            except OSError:  # its pipe broke: the rank is gone (or going)
                self.processes[rank].join(timeout=5)
                self._died(rank)
        return self._gather()[0]

    def _check_alive(self) -> None:
        """Raise ``WorkerDied`` (stopping the group) if a rank has died since the last call."""
        for rank, process in enumerate(self.processes):
            if not process.is_alive():
                self._died(rank)

    def _gather(self, timeout: float | None = None) -> list[Any]:
        """Each rank's answer, failing fast (and stopping the group) when a rank dies."""
        answers: dict[int, tuple[str, Any]] = {}
        waiting = {conn: rank for rank, conn in enumerate(self._conns)}
        sentinels = {process.sentinel: rank for rank, process in enumerate(self.processes)}
        while waiting:
            ready = multiprocessing.connection.wait([*waiting, *sentinels], timeout)
            if not ready:
                self.stop()
                raise WorkerDied(f"{self.describe()}: no answer within {timeout} s; the group was stopped")
            for item in ready:
                if item in waiting:
                    rank = waiting.pop(item)
                    try:
                        answers[rank] = item.recv()
                    except EOFError:
                        self._died(rank)
                elif sentinels[item] in waiting.values():  # type: ignore[index]
                    self._died(sentinels[item])  # type: ignore[index]
        errors = [answers[r][1] for r in sorted(answers) if answers[r][0] == "error"]
        if errors:
            raise errors[0]
        return [answers[r][1] for r in sorted(answers)]

    def _died(self, rank: int) -> None:
        process = self.processes[rank]
        process.join(timeout=1)
        message = (f"{self.describe()}: rank {rank} (pid {process.pid}) died with exit code {process.exitcode}; "
                   "its work in flight is lost, retry it")
        logger.error(message)
        self.stop()
        raise WorkerDied(message)

    def describe(self) -> str:
        return f"trainer group of {self.spec.model_name!r} ({self.spec.ranks} ranks)"

    def alive(self) -> bool:
        return bool(self.processes) and all(process.is_alive() for process in self.processes)

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes if process.pid is not None]

    def stop(self) -> None:
        """Ask the ranks to exit, kill those that do not; idempotent."""
        self._stopping = True
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self._conns:
            conn.close()
        self._conns = []
        self._rendezvous.cleanup()


def _rank_main(rank: int, spec: GroupSpec, init_file: str, conn: multiprocessing.connection.Connection) -> None:
    """One rank: join the process group, build the sharded engine, serve calls until told to stop."""
    import torch.distributed as dist

    try:
        try:
            engine = build_rank_engine(rank, spec, f"file://{init_file}", rank_device(rank, spec))
        except Exception as e:
            conn.send(("error", picklable_error(e)))
            return
        conn.send(("ok", {"vocab_size": engine.vocab_size, "max_context_length": engine.max_context_length}))
        while (message := conn.recv()) is not None:
            conn.send(run_call(engine, *message))
    except EOFError:  # the parent went away
        pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_device(rank: int, spec: GroupSpec) -> str:
    """``spec.devices[rank]``; by default ``cuda:<rank>`` where CUDA is, else cpu."""
    import torch

    device = spec.devices[rank] if spec.devices else ("cuda" if torch.cuda.is_available() else "cpu")
    return f"cuda:{rank}" if device == "cuda" else device


def build_rank_engine(rank: int, spec: GroupSpec, init_method: str, device: str) -> Any:
    """Join the group's ``torch.distributed`` group and build this rank's ``ShardedModelEngine``."""
    import torch
    import torch.distributed as dist

    from tinker_backend.engine.sharded import ShardedModelEngine

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.ranks))  # the ranks share the cores
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=spec.ranks, init_method=init_method)
    dtype = getattr(torch, spec.dtype) if spec.dtype else None
    return ShardedModelEngine(spec.model_name, spec.model_path, device, dtype=dtype, **spec.engine_options)


def run_call(engine: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any]:
    """``("ok", engine.method(...))``, or ``("error", the exception)`` in a picklable form."""
    try:
        return "ok", getattr(engine, method)(*args, **kwargs)
    except Exception as e:
        return "error", picklable_error(e)


def picklable_error(error: Exception) -> Exception:
    from tinker_backend.engine.sharded import picklable

    return picklable(error)
