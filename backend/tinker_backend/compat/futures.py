"""The server side of ``retrieve_future``: each submitted request id and the task computing it.

A long-running call (create_model, forward_backward, asample, ...) answers at once with a
``request_id``; the client then polls ``retrieve_future`` until the answer is there. The
table holds each request's task, long-polls for it, and forgets the answer ``ttl_s`` seconds
after it is ready (a poll after that gets 410, "expired").

Request ids are derived from what makes a request unique (``<model_id>/<seq_id>``,
``<sampling_session_id>/<seq_id>``), and entries are keyed by (owner, request id), so a
re-sent submit finds the first one's entry and is applied once.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

_Key = tuple[str, str]


@dataclass
class Entry:
    """One request: the task computing its answer, and encodings of the answer made so far."""

    task: asyncio.Future[Any]
    encoded: dict[str, bytes] = field(default_factory=dict)


class FutureTable:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[_Key, Entry] = {}
        # Finished requests with their expiry time. Entries finish in time order and the ttl is
        # fixed, so this is sorted by expiry: expiring pops from the front.
        self._expiry: OrderedDict[_Key, float] = OrderedDict()
        self._closing = asyncio.Event()

    def __contains__(self, key: _Key) -> bool:
        return key in self._entries

    def submit(self, owner: str, request_id: str, start: Callable[[], Awaitable[Any]]) -> None:
        """Start ``start()`` for ``request_id``, unless that request is already known."""
        self._expire()
        key = (owner, request_id)
        if key in self._entries:
            return
        task = asyncio.ensure_future(start())
        self._entries[key] = Entry(task)
        task.add_done_callback(lambda done: self._finished(key, done))

    def _finished(self, key: _Key, task: asyncio.Future[Any]) -> None:
        if not task.cancelled():
            task.exception()  # the answer is read through the table, not by awaiting the task
        self._expiry[key] = time.monotonic() + self.ttl_s

    def _expire(self) -> None:
        now = time.monotonic()
        while self._expiry:
            key, expires_at = next(iter(self._expiry.items()))
            if expires_at > now:
                return
            del self._expiry[key]
            del self._entries[key]

    async def wait(self, owner: str, request_id: str, timeout_s: float) -> Entry | None:
        """The request's entry once its answer is ready or ``timeout_s`` has passed (whichever
        is first); None if the request is unknown or its answer has expired."""
        self._expire()
        entry = self._entries.get((owner, request_id))
        if entry is None or entry.task.done():
            return entry
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait([entry.task, closing], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        return entry

    def close(self) -> None:
        """Release every long poll at once (on server shutdown), so none holds it up."""
        self._closing.set()
