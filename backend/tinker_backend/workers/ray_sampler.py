"""``--workers ray``: a sampler worker as a Ray actor, placed by Ray on any node of the cluster.

``RaySampler`` has ``SamplerProcess``'s interface (``send``, ``alive``, ``close``, ``pid``,
``describe``, ``stats``), so ``SamplerPool`` routes to either. The actor is threaded: the
sampler's ``WorkerLoop`` runs on a thread of its own, and each ``call`` waits on one of the
actor's threads for its command's answer, so commands and sampler steps interleave as in a local
worker. Adapter versions are loaded from the folders the trainer group publishes under the data
dir: on a cluster of several machines that dir must be shared (docs/scaling.md).

Faults: the server keeps one never-returning ``watch`` call pending on the actor; when the actor
dies (``kill -9``, out of memory, its node lost) that call raises ``RayActorError`` at once,
every command in flight fails with a retryable 503 naming the worker and its pid, and
``on_death`` is called. Ray does not restart the actor (``max_restarts=0``): the pool starts a new
one, as for a local worker, so that it knows the new actor holds no adapter version.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

import ray

from tinker_backend.errors import ServiceError
from tinker_backend.workers.sampler_worker import SamplerSpec, WorkerLoop

logger = logging.getLogger("tinker_backend.workers")

# Concurrent calls one actor accepts: each waits on an actor thread for its answer, so this
# bounds the sample requests in flight on one replica (routing keeps far fewer there).
_MAX_CONCURRENCY = 256
# How long close waits for the killed actor's pending watch call to fail (Ray marks it dead
# within a second or two; a busy machine can take longer).
_CLOSE_TIMEOUT_S = 10.0


class _SamplerActor:
    """A sampler worker inside its actor: ``WorkerLoop`` on its own thread."""

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


class RaySampler:
    """A started sampler worker actor (1 CPU, or 1 GPU when the spec's device is CUDA)."""

    def __init__(self, spec: SamplerSpec, name: str, on_death: Callable[[RaySampler, str], None],
                 *, start_timeout_s: float = 300.0) -> None:
        self.spec, self.name = spec, name
        self._on_death = on_death
        self.stats: dict[str, Any] = {}
        self.pid: int | None = None
        self._lock = threading.Lock()  # the set of futures in flight, dead, closing
        self._futures: set[Future[Any]] = set()
        self._dead = self._closing = False
        self._watcher: threading.Thread | None = None  # started once the actor answers
        gpus = 1 if (spec.device or "").startswith("cuda") else 0
        actor: Any = ray.remote(_SamplerActor).options(
            num_cpus=1, num_gpus=gpus, max_restarts=0, max_concurrency=_MAX_CONCURRENCY)
        self._actor = actor.remote(spec)
        try:
            info = ray.get(self._actor.info.remote(), timeout=start_timeout_s)
        except BaseException:
            self.close()
            raise
        self.pid = info["pid"]
        self.vocab_size: int = info["vocab_size"]
        self.max_context_length: int = info["max_context_length"]
        self._watcher = threading.Thread(target=self._watch, args=(self._actor.watch.remote(),),
                                         name=f"watch-{name}", daemon=True)
        self._watcher.start()

    def describe(self) -> str:
        return f"{self.name} (Ray actor, pid {self.pid})"

    def alive(self) -> bool:
        return not self._dead and not self._closing

    def send(self, command: str, *args: Any) -> Future[Any]:
        """Run ``command`` in the actor; the future answers with its result or its error."""
        future: Future[Any] = Future()
        with self._lock:
            if self._dead or self._closing:
                future.set_exception(self._died_error())
                return future
            self._futures.add(future)
        ref = self._actor.call.remote(command, args)
        ref.future().add_done_callback(lambda answer: self._answer(future, answer))
        return future

    def _answer(self, future: Future[Any], answer: Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)
        try:
            status, value, self.stats = answer.result()
        except ray.exceptions.RayActorError:  # it died: fail this and every other call in flight,
            # off Ray's callback thread (``_lost`` calls into Ray)
            threading.Thread(target=self._lost, args=([future],), name=f"lost-{self.name}", daemon=True).start()
            return
        except Exception as e:  # the call itself failed (e.g. an answer that does not unpickle)
            _settle(future, error=e)
            return
        if status == "ok":
            _settle(future, result=value)
        else:
            _settle(future, error=value)

    def _watch(self, ref: Any) -> None:
        try:
            ray.get(ref)
        except Exception:  # RayActorError: it died, or close killed it
            pass
        self._lost([])

    def _lost(self, also: list[Future[Any]]) -> None:
        """The actor is gone (seen by the watcher or by a failed call, whichever is first): mark it
        dead before any request fails, so that routing skips it when the client sends again; then
        fail the calls in flight and tell the pool (once; not after ``close``)."""
        with self._lock:
            first, self._dead = not self._dead, True
            lost, self._futures = [*also, *self._futures], set()
            closing = self._closing
        error = self._died_error()
        if first and not closing:
            logger.error("%s", error.message)
            self._kill()  # an actor only unreachable for now must not come back beside its successor
            self._on_death(self, error.message)
        for future in lost:
            _settle(future, error=error)

    def _died_error(self) -> ServiceError:
        return ServiceError(503, f"sampler worker {self.describe()} died; its requests in flight are lost "
                                 "(retryable: send them again)")

    def close(self) -> None:
        """Kill the actor and wait for its watcher to see it gone, so that no thread is still
        inside Ray when the server shuts Ray down; idempotent."""
        with self._lock:
            self._closing = True
        self._kill()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=_CLOSE_TIMEOUT_S)

    def _kill(self) -> None:
        try:
            ray.kill(self._actor)
        except Exception:  # already dead
            pass


def _settle(future: Future[Any], *, result: Any = None, error: BaseException | None = None) -> None:
    """Answer ``future`` unless the actor's death already failed it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
