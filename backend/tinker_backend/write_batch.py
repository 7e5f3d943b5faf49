"""The store writes of answered training requests, one transaction per event-loop turn.

A clock cycle answers every run's requests at once; recording each answer (and each finished
history step) in a transaction of its own cost one SQLite commit per request, on the event
loop, while the compute thread is already running the next cycle. ``WriteBatch`` collects the
writes that the answers of one loop turn make and commits them together: the coroutines woken
by one cycle's answers all queue their writes before the flush, which ``call_soon`` runs after
them. An answer still leaves only once its record is committed (``record_answer`` waits for
the flush), so what a reload must not lose is on disk first (see ``store.Store.record_answer``).
"""

from __future__ import annotations

import asyncio
import logging

from tinker_backend.store import HistoryPoint, Store

logger = logging.getLogger("tinker_backend")


class WriteBatch:
    """Answer records and history rows of one event loop, committed once per loop turn."""

    def __init__(self, store: Store, max_points: int) -> None:
        """``max_points``: history rows kept per run (see ``Store.add_history``)."""
        self.store = store
        self.max_points = max_points
        self._answers: list[tuple[str, int, bool]] = []
        self._points: list[HistoryPoint] = []
        self._flushed: asyncio.Future[None] | None = None

    async def record_answer(self, run_id: str, seq_id: int, mutating: bool) -> None:
        """Record that the answer of ``seq_id`` is about to leave; returns once committed."""
        self._answers.append((run_id, seq_id, mutating))
        # Shielded: a waiter cancelled (the server stopping) must not cancel the others' flush.
        await asyncio.shield(self._scheduled())

    def add_history(self, point: HistoryPoint) -> None:
        """Queue one history row; committed with this turn's answers (or alone)."""
        self._points.append(point)
        self._scheduled()

    def flush(self) -> None:
        """Commit what is queued now (also run by the loop once per turn that queued anything)."""
        answers, points, flushed = self._answers, self._points, self._flushed
        self._answers, self._points, self._flushed = [], [], None
        try:
            if answers or points:
                self.store.write_answers(answers, points, self.max_points)
        except Exception as e:
            if flushed is None or flushed.done():
                raise
            flushed.set_exception(e)
            flushed.exception()  # retrieved: a turn with no waiter left logs it here instead
            logger.exception("writing %d answer records and %d history rows failed", len(answers), len(points))
            return
        if flushed is not None and not flushed.done():
            flushed.set_result(None)

    def _scheduled(self) -> asyncio.Future[None]:
        if self._flushed is None:
            loop = asyncio.get_running_loop()
            self._flushed = loop.create_future()
            loop.call_soon(self.flush)
        return self._flushed
