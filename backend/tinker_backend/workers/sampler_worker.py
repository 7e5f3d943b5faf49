"""One sampler worker: a ``spawn``ed process holding a base model and its sampler.

The sampler is the torch sampler, or with ``SamplerSpec.sampler == "vllm"`` vLLM with the
torch sampler beside it for the adapters vLLM cannot serve (``RoutedSampler``, as in the
server's own process). vLLM gives each version it loads a fresh LoRA name, integer id and folder
(``VllmSampler.add_adapter``), so its prefix cache never serves a stale version. Its engine core
is a child process of the worker: the worker leads its own process group so that the server can
kill that child too when the worker dies (``kill -9`` leaves it orphaned otherwise).

The server talks to it over a pipe: each message is ``(request_id, command, args)`` and each
answer ``(request_id, "ok" | "error", value, stats)``. Commands: ``load`` (an adapter version
from its PEFT folder), ``remove``, ``sample`` (which first loads its adapter version when the
worker does not hold it, so that a load error is that sample's error). The worker's main thread runs the sampler
continuously (a prefill chunk and a decode step per ``step``) and takes commands between steps,
so it never waits on the server's training.

``SamplerProcess`` is the server's side: it starts the process, sends commands (each returns a
``concurrent.futures.Future``), and a reader thread answers the futures. When the process dies
(``kill -9``, out of memory) the reader sees its sentinel at once: every future in flight fails
with a retryable 503 naming the worker and its pid, and ``on_death`` is called (the pool
restarts it).
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinker_backend.errors import ServiceError

logger = logging.getLogger("tinker_backend.workers")

Reply = Callable[[str, Any], None]


@dataclass(frozen=True)
class SamplerSpec:
    """What a sampler worker loads: the base model, on which device, in which dtype."""

    model_name: str
    model_path: Path
    device: str | None = None  # "cpu" or "cuda"; None: cuda where there is one, else cpu
    dtype: str | None = None  # "float32" / "bfloat16"; None: the engine's default for the device
    threads: int | None = None  # torch threads; None: torch's default
    sampler: str = "torch"  # or "vllm": vLLM, with the torch sampler for what it cannot serve
    sampler_dir: Path | None = None  # vllm: where each replica's vLLM keeps its adapter folders
    max_lora_rank: int = 256  # vllm: the rank its LoRA buffers are sized for


class SamplerProcess:
    """A started sampler worker process; ``send`` runs a command in it."""

    def __init__(self, spec: SamplerSpec, name: str, on_death: Callable[[SamplerProcess, str], None],
                 *, start_timeout_s: float = 300.0) -> None:
        self.spec, self.name = spec, name
        self._on_death = on_death
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(spec, name, child), name=name, daemon=True)
        self.process.start()
        child.close()
        self._lock = threading.Lock()  # sends and the table of futures
        self._futures: dict[int, Future[Any]] = {}
        self._ids = itertools.count()
        self._closing = False
        self.stats: dict[str, Any] = {}
        ready = multiprocessing.connection.wait([self._conn, self.process.sentinel], start_timeout_s)
        if self._conn not in ready:
            self.close()
            raise RuntimeError(f"{self.describe()}: did not start within {start_timeout_s} s (exit code "
                               f"{self.process.exitcode})")
        status, info = self._conn.recv()
        if status != "ok":
            self.close()
            raise RuntimeError(f"{self.describe()}: could not load the model: {info}")
        self.vocab_size: int = info["vocab_size"]
        self.max_context_length: int = info["max_context_length"]
        threading.Thread(target=self._read, name=f"read-{name}", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid})"

    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, command: str, *args: Any) -> Future[Any]:
        """Run ``command`` in the worker; the future answers with its result or its error."""
        future: Future[Any] = Future()
        with self._lock:
            if not self.process.is_alive() or self._closing:
                future.set_exception(self._died_error())
                return future
            request_id = next(self._ids)
            self._futures[request_id] = future
            try:
                self._conn.send((request_id, command, args))
            except OSError:  # its pipe broke: the reader fails the future
                pass
        return future

    def _read(self) -> None:
        """Answer futures as their answers come; when the process dies, fail the rest."""
        while True:
            ready = multiprocessing.connection.wait([self._conn, self.process.sentinel])
            if self._conn in ready:
                try:
                    request_id, status, value, stats = self._conn.recv()
                except (EOFError, OSError):
                    break
                self.stats = stats
                with self._lock:
                    future = self._futures.pop(request_id, None)
                if future is not None and status == "ok":
                    future.set_result(value)
                elif future is not None:
                    future.set_exception(value)
            elif self.process.sentinel in ready:
                break
        self.process.join(timeout=5)
        self._kill_group()
        with self._lock:
            lost, self._futures = list(self._futures.values()), {}
            closing = self._closing
        error = self._died_error()
        if not closing:
            logger.error("%s", error.message)
        for future in lost:
            future.set_exception(error)
        if not closing:
            self._on_death(self, error.message)

    def _died_error(self) -> ServiceError:
        return ServiceError(503, f"sampler worker {self.describe()} died with exit code {self.process.exitcode}; "
                                 "its requests in flight are lost (retryable: send them again)")

    def close(self) -> None:
        """Ask the worker to exit, kill it if it does not; idempotent."""
        with self._lock:
            self._closing = True
            try:
                self._conn.send(None)
            except OSError:
                pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._kill_group()

    def _kill_group(self) -> None:
        """Kill what is left of the worker's process group (vLLM's engine core, when the worker
        died before stopping it); nothing when it stopped cleanly."""
        if self.spec.sampler != "vllm" or self.pid is None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # the group is gone already
            pass


class WorkerLoop:
    """A sampler worker's engine and its loop: commands and sampler steps, in order, on the
    thread that calls ``run``. ``put`` is thread-safe; each command answers through its
    ``reply(status, value)``, a sample's from its future's callback when it is done."""

    def __init__(self, spec: SamplerSpec, name: str | None = None) -> None:
        import torch

        from tinker_backend.engine.model_engine import ModelEngine

        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        dtype = getattr(torch, spec.dtype) if spec.dtype else None
        # Each replica's vLLM empties its own folder at start (named after the replica, so a
        # restart drops the dead one's files; else after this process).
        sampler_dir = None if spec.sampler_dir is None else spec.sampler_dir / (name or f"pid-{os.getpid()}")
        self.engine = ModelEngine(spec.model_name, spec.model_path, spec.device, dtype, sampler=spec.sampler,
                                  sampler_dir=sampler_dir, max_lora_rank=spec.max_lora_rank)
        self._inbox: queue.Queue[tuple[str, tuple[Any, ...], Reply] | None] = queue.Queue()

    def put(self, command: str, args: tuple[Any, ...], reply: Reply) -> None:
        self._inbox.put((command, args, reply))

    def stop(self) -> None:
        self._inbox.put(None)

    def run(self) -> None:
        """Until ``stop``: take the commands waiting, else step the sampler, else wait."""
        sampler = self.engine.sampler
        while True:
            try:
                message = self._inbox.get(block=not sampler.has_work())
            except queue.Empty:
                sampler.step()
                continue
            if message is None:
                break
            self._handle(*message)
        self.engine.close()

    def _handle(self, command: str, args: tuple[Any, ...], reply: Reply) -> None:
        from tinker_backend.engine.sharded import picklable

        engine = self.engine
        try:
            if command == "load":
                sampler_id, directory = args
                if not engine.has_sampler(sampler_id):
                    engine.load_sampler(sampler_id, Path(directory))
                reply("ok", None)
            elif command == "remove":
                if engine.has_sampler(args[0]):
                    engine.remove_sampler(args[0])
                reply("ok", None)
            elif command == "sample":
                sampler_id, directory, *sample_args = args
                if sampler_id is not None and not engine.has_sampler(sampler_id):
                    engine.load_sampler(sampler_id, Path(directory))
                future = engine.submit_sample(sampler_id, *sample_args)
                future.add_done_callback(
                    lambda f: reply("ok", f.result()) if f.exception() is None
                    else reply("error", picklable(f.exception()))
                )
            else:
                raise ValueError(f"command: expected load, remove or sample, got {command!r}")
        except Exception as e:
            reply("error", picklable(e))


def _worker_main(spec: SamplerSpec, name: str, conn: multiprocessing.connection.Connection) -> None:
    """The worker process: load the model, then serve the pipe's commands (``WorkerLoop``)."""
    if spec.sampler == "vllm":
        _own_process_group()
    try:
        loop = WorkerLoop(spec, name)
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    engine = loop.engine
    conn.send(("ok", {"vocab_size": engine.vocab_size, "max_context_length": engine.max_context_length}))
    send_lock = threading.Lock()  # answers come from the loop and from sample futures' callbacks

    def receive() -> None:
        try:
            while (message := conn.recv()) is not None:
                request_id, command, args = message
                loop.put(command, args, functools.partial(answer, request_id))
        except (EOFError, OSError):  # the server went away
            pass
        loop.stop()

    def answer(request_id: int, status: str, value: Any) -> None:
        with send_lock:
            conn.send((request_id, status, value, _stats(engine, spec.sampler)))

    threading.Thread(target=receive, daemon=True).start()
    loop.run()


def _own_process_group() -> None:
    """Prepare a vLLM worker: vLLM's engine core, its child process, joins the worker's own process
    group, which the server kills when the worker dies (``SamplerProcess._kill_group``) and which the
    worker kills on SIGTERM (what multiprocessing sends daemonic children at the server's exit)."""
    os.setsid()
    # Daemonic processes may not start children; this one stops them itself, as said above.
    multiprocessing.current_process().daemon = False
    signal.signal(signal.SIGTERM, lambda signum, frame: os.killpg(0, signal.SIGKILL))


def _stats(engine: Any, kind: str) -> dict[str, Any]:
    """The engine's counters, the sampler kind and, with vLLM, the versions the torch sampler
    serves instead (a LoRA on lm_head): sent with every answer."""
    stats: dict[str, Any] = {**engine.stats(), "sampler": kind}
    fallback_ids = getattr(engine.sampler, "fallback_ids", None)
    if fallback_ids is not None:
        stats["torch_served"] = fallback_ids()
    return stats


def worker_name(model_name: str, index: int) -> str:
    """The name of a model's sampler replica in logs, errors and process listings."""
    return f"sampler-{model_name[-24:]}-{index}"


def default_threads(replicas: int) -> int:
    """Torch threads per worker: the machine's cores shared between the replicas."""
    return max(1, (os.cpu_count() or 1) // max(1, replicas))
