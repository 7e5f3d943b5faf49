"""Per-owner limits and session liveness: the bookkeeping that keeps one tenant from crowding out others.

An *owner* is what an API key maps to (``local`` for the embedded backend and open servers).
Three limits, each ``None`` for "no limit":

* ``max_runs``: training runs loaded in the engine at once. A run stops counting when its
  session expires (no heartbeat or request for ``session_timeout_s``).
* ``max_pending``: requests of the owner being handled at once (queued or running).
* ``max_storage_bytes``: bytes of the owner's checkpoints; a save is refused while the owner
  is at or over it (one save may overshoot it).

Over a limit, a request is answered ``429`` with a ``retry_after`` and *not* started; the
``tinker`` client waits and sends it again, so work queues instead of failing. A training
request that fills the gap at the head of its run's ``seq_id`` order is never refused for
``max_pending`` while requests behind it are queued: they wait for it, and refusing it
would deadlock them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from tinker_backend.errors import ServiceError

# How long a client should wait before sending a refused request again, per limit.
RETRY_AFTER_PENDING_S = 1.0
RETRY_AFTER_RUNS_S = 5.0
RETRY_AFTER_STORAGE_S = 30.0


@dataclass(frozen=True)
class KeyLimits:
    max_runs: int | None = None
    max_pending: int | None = None
    max_storage_bytes: int | None = None


class RateLimited(ServiceError):
    """A 429: the request was not started; send it again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(429, message, "user")
        self.retry_after = retry_after


@dataclass
class _RunOrder:
    """Which ``seq_id``s of one run have been accepted: all below ``next_missing``, plus ``ahead``."""

    next_missing: int = 1
    ahead: set[int] = field(default_factory=set)

    def accept(self, seq_id: int) -> None:
        if seq_id >= self.next_missing:
            self.ahead.add(seq_id)
            while self.next_missing in self.ahead:
                self.ahead.remove(self.next_missing)
                self.next_missing += 1


class Ledger:
    """Counts per owner (pending requests, loaded runs) and session liveness; lives on the event loop."""

    def __init__(self, limits: KeyLimits, session_timeout_s: float | None) -> None:
        self.limits = limits
        self.session_timeout_s = session_timeout_s
        self._pending: dict[str, int] = defaultdict(int)
        self._runs: dict[str, set[str]] = defaultdict(set)  # owner -> loaded run ids
        self._orders: dict[str, _RunOrder] = {}
        self._seen: dict[str, float] = {}  # session id -> last activity (monotonic)

    # --- pending requests ---

    def enter(self, owner: str, *, exempt: bool = False) -> None:
        """Admit one request of ``owner`` (raises ``RateLimited``); pair with ``leave``."""
        self.check(owner, exempt=exempt)
        self._pending[owner] += 1

    def check(self, owner: str, *, exempt: bool = False) -> None:
        """Raise ``RateLimited`` if ``enter`` would refuse a request of ``owner`` now."""
        limit = self.limits.max_pending
        if limit is not None and not exempt and self._pending.get(owner, 0) >= limit:
            raise RateLimited(
                f"pending: expected at most {limit} requests in progress per API key, got {limit + 1}; "
                f"retry after {RETRY_AFTER_PENDING_S:g}s",
                RETRY_AFTER_PENDING_S,
            )

    def leave(self, owner: str) -> None:
        self._pending[owner] -= 1
        if self._pending[owner] <= 0:
            del self._pending[owner]

    def pending(self, owner: str) -> int:
        return self._pending.get(owner, 0)

    def fills_gap(self, run_id: str, seq_id: int) -> bool:
        """Whether ``seq_id`` is the request that run ``run_id``'s queued requests wait for."""
        order = self._orders.get(run_id)
        return order is not None and seq_id == order.next_missing and bool(order.ahead)

    def accept_seq(self, run_id: str, seq_id: int) -> None:
        """Note that ``seq_id`` of ``run_id`` has been queued."""
        order = self._orders.get(run_id)
        if order is not None:
            order.accept(seq_id)

    def start_order(self, run_id: str, next_missing: int) -> None:
        """A (re)loaded run waits for ``next_missing`` first."""
        self._orders[run_id] = _RunOrder(next_missing=next_missing)

    # --- loaded runs ---

    def claim_run(self, owner: str, run_id: str) -> None:
        """Count ``run_id`` as loaded (raises ``RateLimited`` over ``max_runs``)."""
        runs = self._runs[owner]
        limit = self.limits.max_runs
        if run_id not in runs and limit is not None and len(runs) >= limit:
            raise RateLimited(
                f"runs: expected at most {limit} loaded training runs per API key, got {limit + 1}; "
                f"retry after {RETRY_AFTER_RUNS_S:g}s (the runs of sessions that stop heartbeating are freed)",
                RETRY_AFTER_RUNS_S,
            )
        runs.add(run_id)

    def release_run(self, owner: str, run_id: str) -> None:
        self._runs[owner].discard(run_id)
        self._orders.pop(run_id, None)

    def loaded_runs(self, owner: str) -> int:
        return len(self._runs.get(owner, ()))

    # --- storage ---

    def check_storage(self, owner: str, used_bytes: int) -> None:
        limit = self.limits.max_storage_bytes
        if limit is not None and used_bytes >= limit:
            raise RateLimited(
                f"storage: expected at most {limit} checkpoint bytes per API key, got {used_bytes} already stored; "
                f"delete checkpoints or let their ttl_seconds expire (retry after {RETRY_AFTER_STORAGE_S:g}s)",
                RETRY_AFTER_STORAGE_S,
            )

    # --- sessions ---

    def touch(self, session_id: str) -> None:
        self._seen[session_id] = time.monotonic()

    def forget(self, session_id: str) -> None:
        self._seen.pop(session_id, None)

    def live_sessions(self) -> int:
        """Sessions seen and not expired (for metrics)."""
        return sum(1 for s in self._seen if not self.is_expired(s))

    def expired_sessions(self) -> list[str]:
        """Sessions with no heartbeat or request for ``session_timeout_s`` (none without a timeout)."""
        return [s for s in self._seen if self.is_expired(s)]

    def is_expired(self, session_id: str) -> bool:
        if self.session_timeout_s is None or session_id not in self._seen:
            return False
        return self._seen[session_id] < time.monotonic() - self.session_timeout_s
