"""Per-base-model scheduling: seq_id order per run, clock cycles across runs, one compute thread.

Each base model has one ``ModelScheduler`` and one compute thread; the engine is only ever
touched from that thread (but for its thread-safe ``submit_sample``), never from the event
loop. A run's training requests execute strictly in ``seq_id`` order and wait on gaps. A
*clock cycle* gathers, for every run, the ready ``forward`` / ``forward_backward`` requests at
the head of its queue plus the ordered operation that follows them (``optim_step``, a save or
a load: a barrier for that run only), executes all gathered forward/backward work in one
``forward_backward_many`` call, then the barriers (inside the engine's ``joint_optim_steps``,
so that the runs' ``optim_step``s apply as one fused AdamW update). A repeated ``(run, seq_id)`` is answered
with the first answer and applied once. Between clock cycles the torch sampler gets one step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from tinker_backend.engine.protocol import Engine, FwdBwdItem, StepSampler
from tinker_backend.errors import ServiceError

logger = logging.getLogger("tinker_backend.scheduler")

# Answers kept per run for de-duplicating re-sent requests (a reconnecting client re-sends
# only what it has not heard back about, so a short window is enough).
_ANSWER_WINDOW = 4096


# An ordered request's work: a forward/backward merged into a clock cycle, or a barrier
# (optim_step, a save, a load) run on its own after the cycle's merged pass.
Work: TypeAlias = FwdBwdItem | Callable[[Engine], Any]


@dataclass
class _Pending:
    work: Work
    future: asyncio.Future[Any]


@dataclass
class _RunQueue:
    next_seq: int = 1
    pending: dict[int, _Pending] = field(default_factory=dict)
    answers: OrderedDict[int, asyncio.Future[Any]] = field(default_factory=OrderedDict)


class ModelScheduler:
    """Owns one base model's engine, its compute thread and its runs' queues."""

    def __init__(
        self,
        base_model: str,
        load_engine: Callable[[], Engine],
        *,
        max_runs_per_cycle: int = 64,
        max_tokens_per_cycle: int = 16384,
    ) -> None:
        self.base_model = base_model
        self.max_runs_per_cycle = max_runs_per_cycle
        self.max_tokens_per_cycle = max_tokens_per_cycle
        self._rotation = itertools.count()
        self._load_engine = load_engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{base_model[-24:]}")
        self._engine: asyncio.Future[Engine] | None = None
        self._runs: dict[str, _RunQueue] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cycles = itertools.count(1)
        self._sampler: StepSampler | None = None  # the engine's sampler, once a sample request arrived

    async def engine(self) -> Engine:
        """The engine, loaded on the compute thread the first time it is needed."""
        if self._engine is None:
            self._engine = asyncio.get_running_loop().run_in_executor(self._executor, _loaded_and_frozen, self._load_engine)
        try:
            return await asyncio.shield(self._engine)
        except Exception as e:
            self._engine = None
            raise ServiceError(400, f"base_model: cannot load {self.base_model!r}: {e}") from e

    async def compute(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` on the compute thread (FIFO with clock cycles)."""
        engine = await self.engine()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, engine)
        finally:
            self._drop_runs_if_lost(engine)

    async def sample(self, submit: Callable[[Engine], concurrent.futures.Future[Any]]) -> Any:
        """Queue a sample request with the engine's sampler and wait for its answer.

        ``submit(engine)`` validates and queues the request (raising for a bad one) and returns
        a future. The torch sampler computes on the compute thread: ``_run_cycles`` gives it one
        step (a prefill chunk and one decode step for every running row) between clock cycles.
        The vLLM sampler computes on its own and never needs a step.
        """
        engine = await self.engine()
        self._sampler = engine.sampler
        future = submit(engine)
        if self._task is None:
            self._task = asyncio.create_task(self._run_cycles(), name=f"cycles-{self.base_model}")
        self._wakeup.set()
        return await asyncio.wrap_future(future)

    def _sampling_pending(self) -> bool:
        return self._sampler is not None and self._sampler.has_work()

    async def _sampling_step(self) -> None:
        if self._sampler is not None and self._sampler.has_work():
            await asyncio.get_running_loop().run_in_executor(self._executor, self._sampler.step)

    def add_run(self, run_id: str, next_seq: int = 1) -> None:
        """Give ``run_id`` a queue whose first request is ``next_seq`` (a run reloaded after a
        restart resumes after its last answered ``seq_id``). A run that has a queue keeps it."""
        self._runs.setdefault(run_id, _RunQueue(next_seq=next_seq))

    def remove_run(self, run_id: str, error: BaseException) -> None:
        """Forget ``run_id``'s queue and its kept answers; the requests waiting in it fail with
        ``error``. Work of the run already taken into a clock cycle still completes."""
        queue = self._runs.pop(run_id, None)
        for item in queue.pending.values() if queue is not None else ():
            _settle(item.future, error)

    def run_count(self) -> int:
        return len(self._runs)

    def queue_depth(self) -> int:
        """Training requests waiting in the runs' queues (for metrics)."""
        return sum(len(queue.pending) for queue in self._runs.values())

    def loaded_engine(self) -> Engine | None:
        """The engine if it has loaded (for metrics and the console; never starts a load)."""
        engine = self._engine
        if engine is None or not engine.done() or engine.cancelled() or engine.exception() is not None:
            return None
        return engine.result()

    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    def submit(self, run_id: str, seq_id: int, work: Work) -> asyncio.Future[Any]:
        """Queue one ordered request of a run; the same ``seq_id`` twice gets the same future."""
        queue = self._runs[run_id]
        if seq_id in queue.answers:
            return queue.answers[seq_id]
        if seq_id in queue.pending:
            return queue.pending[seq_id].future
        if seq_id < queue.next_seq:
            raise ServiceError(
                409, f"seq_id: {seq_id} of run {run_id} already ran and its answer is no longer kept"
            )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queue.pending[seq_id] = _Pending(work, future)
        if self._task is None:
            self._task = asyncio.create_task(self._run_cycles(), name=f"cycles-{self.base_model}")
        self._wakeup.set()
        return future

    async def _run_cycles(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while (cycle := self._collect()) or self._sampling_pending():
                if cycle:
                    await self._execute(cycle)
                await self._sampling_step()  # between clock cycles: neither starves the other
                await asyncio.sleep(0)  # let newly arrived requests join the next cycle

    def _collect(self) -> dict[str, tuple[list[_Pending], _Pending | None]]:
        """For each run: the ready forward/backward work at its head and the barrier after it.

        A cycle takes at most ``max_runs_per_cycle`` runs (the engine's adapter slots) and about
        ``max_tokens_per_cycle`` tokens; what does not fit waits for the next cycle. Runs are
        visited round-robin from a rotating start, so none starves.
        """
        cycle: dict[str, tuple[list[_Pending], _Pending | None]] = {}
        tokens = 0
        run_ids = list(self._runs)
        start = next(self._rotation) % len(run_ids) if run_ids else 0
        for run_id in run_ids[start:] + run_ids[:start]:
            if len(cycle) >= self.max_runs_per_cycle:
                break
            queue = self._runs[run_id]
            fwd: list[_Pending] = []
            barrier: _Pending | None = None
            seq = queue.next_seq
            while seq in queue.pending:
                item = queue.pending[seq]
                if isinstance(item.work, FwdBwdItem):
                    size = sum(d.model_input.length for d in item.work.data)
                    if tokens and tokens + size > self.max_tokens_per_cycle:
                        break  # the cycle is full; this run continues next cycle
                    tokens += size
                    fwd.append(item)
                else:
                    barrier = item
                del queue.pending[seq]
                self._remember(queue, seq, item.future)
                seq += 1
                if barrier is not None:
                    break
            queue.next_seq = seq
            if fwd or barrier:
                cycle[run_id] = (fwd, barrier)
        return cycle

    @staticmethod
    def _remember(queue: _RunQueue, seq: int, future: asyncio.Future[Any]) -> None:
        queue.answers[seq] = future
        while len(queue.answers) > _ANSWER_WINDOW:
            queue.answers.popitem(last=False)

    async def _execute(self, cycle: dict[str, tuple[list[_Pending], _Pending | None]]) -> None:
        cycle_id = next(self._cycles)
        try:
            engine = await self.engine()
        except ServiceError as e:
            for fwd, barrier in cycle.values():
                for item in [*fwd, *([barrier] if barrier else [])]:
                    _settle(item.future, e)
            return
        outcomes = await asyncio.get_running_loop().run_in_executor(
            self._executor, _run_cycle, engine, cycle, cycle_id
        )
        for item, outcome in outcomes:
            _settle(item.future, outcome)
        self._drop_runs_if_lost(engine)

    def _drop_runs_if_lost(self, engine: Engine) -> None:
        """An engine on worker processes (``workers.local``) whose workers died lost every run's
        adapter: forget the runs (failing their waiting requests), so each reloads on next use."""
        take_lost = getattr(engine, "take_lost", None)
        lost = take_lost() if take_lost is not None else None
        if lost is not None:
            for run_id in list(self._runs):
                self.remove_run(run_id, lost)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._sampler is not None:
            self._sampler.close()  # fails the requests in flight; stops a vLLM engine
        if self._engine is not None:
            gc.unfreeze()  # the engine may be garbage now (it holds cycles): let a collection see it


def _loaded_and_frozen(load_engine: Callable[[], Engine]) -> Engine:
    """``load_engine()``, then everything alive moved out of the cyclic GC's reach (``gc.freeze``).

    A loaded model leaves a large heap of long-lived objects (modules, tensors, tokenizer). Each
    full collection traversed all of it: about 240 ms on the 2-core CPU, landing on whichever
    thread allocated last (the compute thread or the event loop), about once per 12 steps of 32
    small runs, whose requests allocate far more than one run's. Frozen objects are still freed
    by reference counting; only cycles among them wait until ``close()`` unfreezes them (an
    engine holds cycles, so a dropped one is reclaimed then).
    """
    engine = load_engine()
    gc.collect()  # garbage cycles from the load are freed now, not frozen
    gc.freeze()
    return engine


def _run_cycle(
    engine: Engine, cycle: dict[str, tuple[list[_Pending], _Pending | None]], cycle_id: int
) -> list[tuple[_Pending, Any]]:
    """One clock cycle on the compute thread: merged forward/backward, then each run's barrier."""
    outcomes: list[tuple[_Pending, Any]] = []
    merged = [(item, item.work) for fwd, _ in cycle.values() for item in fwd if isinstance(item.work, FwdBwdItem)]
    if merged:
        started = time.perf_counter()
        try:
            results = engine.forward_backward_many([work for _, work in merged])
        except Exception as e:  # a failure of the whole pass fails each of its requests
            logger.exception("clock cycle %d failed", cycle_id)
            results = [e] * len(merged)
        tokens = sum(d.model_input.length for _, work in merged for d in work.data)
        for (item, _), result in zip(merged, results, strict=True):
            if not isinstance(result, Exception):
                result.metrics["clock_cycle:unique"] = float(cycle_id)
                result.metrics["cycle_runs:max"] = float(len(cycle))
                result.metrics["cycle_tokens:max"] = float(tokens)
                result.metrics["cycle_seconds:max"] = time.perf_counter() - started
            outcomes.append((item, result))
    barriers = [barrier for _, barrier in cycle.values() if barrier is not None]
    # An engine that can applies the cycle's optim_steps as one fused update of all their runs.
    joint = getattr(engine, "joint_optim_steps", None)
    done = len(outcomes)
    try:
        with joint() if joint is not None and len(barriers) > 1 else contextlib.nullcontext():
            for barrier in barriers:
                work = barrier.work
                assert not isinstance(work, FwdBwdItem)
                try:
                    outcomes.append((barrier, work(engine)))
                except Exception as e:
                    outcomes.append((barrier, e))
    except Exception as e:  # the joint update failed (e.g. out of memory): its barriers failed
        logger.exception("clock cycle %d: the joint optimizer update failed", cycle_id)
        outcomes[done:] = [(barrier, e) for barrier, _ in outcomes[done:]]
    return outcomes


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
