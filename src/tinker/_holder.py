"""What the clients of one ``ServiceClient`` share: the loop, the transport, the session."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from tinker import wire
from tinker._transport import EmbeddedTransport, Transport, WebSocketTransport
from tinker.errors import NotFoundError, TinkerError
from tinker.futures import APIFuture, BackgroundLoop

T = TypeVar("T")
logger = logging.getLogger("tinker")

# How often a client tells a server its session is alive (as the Tinker SDK does). A server
# unloads the runs of a session silent for its session timeout (300 s by default).
HEARTBEAT_INTERVAL_S = 10.0


class Holder:
    """Owns the transport and the session; hands out model and sampler numbers."""

    def __init__(
        self,
        *,
        base_url: str | None,
        api_key: str | None,
        data_dir: str | os.PathLike[str] | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> None:
        self.loop = BackgroundLoop.get()
        self.base_url = base_url or os.environ.get("TINKER_BASE_URL") or None
        api_key = api_key or os.environ.get("TINKER_API_KEY")
        self.transport: Transport = (
            WebSocketTransport(self.base_url, api_key)
            if self.base_url
            else EmbeddedTransport.shared(data_dir)
        )
        if isinstance(self.transport, WebSocketTransport):  # for a script that never calls close()
            self.loop.close_at_exit(self.transport)
        self._user_metadata = dict(user_metadata or {})
        self._session: APIFuture[str] | None = None
        self._lock = threading.Lock()
        self._model_seq = itertools.count()
        self._sampler_seq = itertools.count()
        self._tokenizers: dict[str, Any] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    def submit(self, coro: Coroutine[Any, Any, T]) -> APIFuture[T]:
        return self.loop.submit(coro)

    async def call(self, request: Any) -> Any:
        return await self.transport.call(request)

    def session_id(self) -> APIFuture[str]:
        """The session, created on first use (no network I/O until then)."""
        with self._lock:
            if self._session is None:
                self._session = self.submit(self._create_session())
            return self._session

    async def _create_session(self) -> str:
        reply = await self.call(wire.CreateSession(user_metadata=self._user_metadata))
        if isinstance(self.transport, WebSocketTransport):  # the embedded backend never expires sessions
            self._heartbeat = asyncio.create_task(self._send_heartbeats(reply.session_id))
        return reply.session_id

    async def _send_heartbeats(self, session_id: str) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                await self.transport.call(wire.Heartbeat(session_id=session_id))
            except NotFoundError:  # the server does not know the session (a new data dir): stop
                return
            except TinkerError as e:
                logger.debug("heartbeat of session %s failed: %s", session_id, e)

    def next_model_seq(self) -> int:
        with self._lock:
            return next(self._model_seq)

    def next_sampler_seq(self) -> int:
        with self._lock:
            return next(self._sampler_seq)

    def get_tokenizer(self, base_model: str) -> Any:
        """The base model's tokenizer, rebuilt locally from files the backend sends (works offline)."""
        with self._lock:
            if base_model in self._tokenizers:
                return self._tokenizers[base_model]
        files = self.submit(self.call(wire.GetTokenizer(base_model=base_model))).future().result().files
        tokenizer = _load_tokenizer(base_model, files)
        with self._lock:
            self._tokenizers.setdefault(base_model, tokenizer)
            return self._tokenizers[base_model]

    async def aclose(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self.transport.aclose()


def _load_tokenizer(base_model: str, files: dict[str, bytes]) -> Any:
    from transformers import AutoTokenizer

    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base_model)[-64:]
    folder = _cache_dir() / "tokenizers" / f"{safe}-{digest.hexdigest()[:16]}"
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / Path(name).name).write_bytes(data)
        (folder / ".complete").touch()
    return AutoTokenizer.from_pretrained(folder)


def _cache_dir() -> Path:
    return Path(os.environ.get("TINKER_CACHE_DIR") or Path.home() / ".cache" / "tinker")


async def wrap(future: APIFuture[T]) -> T:
    """Await an ``APIFuture`` from a coroutine on the background loop. Cancelling the awaiting
    coroutine leaves ``future`` running: others wait on it too (a run's creation, the session)."""
    return await asyncio.shield(asyncio.wrap_future(future.future()))
