"""How requests reach a backend: over one WebSocket to a server, or in-process.

Both transports run the same msgpack encode / decode path, so the embedded default and a
remote ``tinker-server`` validate and answer identically; only the bytes' journey differs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from pathlib import Path
from typing import Any, ClassVar, NoReturn, Protocol

import aiohttp
import msgspec

from tinker import wire
from tinker.errors import APIConnectionError, RequestFailedError, TinkerError, error_for_status

logger = logging.getLogger("tinker")

# How long a broken connection is retried before pending calls fail. Long enough to ride out
# a server restart; training calls are deduplicated server-side, so re-sending is safe.
RECONNECT_TIMEOUT_S = 60.0
# WebSocket ping interval: detects a dead peer on an idle connection.
HEARTBEAT_S = 20.0
# How long a request the server refuses with 429 (a per-key limit) is sent again before the
# RateLimitError is raised: work queues rather than fails. The server says how long to wait.
RATE_LIMIT_TIMEOUT_S = 600.0
_RETRY_AFTER_DEFAULT_S, _RETRY_AFTER_MAX_S = 1.0, 30.0
_MAX_FRAME_HEADER = "X-Tinker-Max-Frame-Bytes"  # the server's frame size limit, in its handshake response


class Transport(Protocol):
    async def call(self, request: Any) -> Any:
        """Send one request and return its decoded response (or raise a ``TinkerError``)."""
        ...

    async def aclose(self) -> None: ...


def raise_failure(failure: wire.Failure) -> NoReturn:
    """Turn a server ``Failure`` into the matching client error."""
    if failure.status >= 500:
        raise RequestFailedError(failure.message, failure.category)
    raise error_for_status(failure.status, failure.message)


class EmbeddedTransport:
    """Runs the backend in this process (on the client's background loop; compute on its own threads)."""

    _shared: ClassVar[dict[str, EmbeddedTransport]] = {}
    _shared_lock = threading.Lock()

    def __init__(self, data_dir: Path) -> None:
        from tinker_backend.request_handler import RequestHandler

        self.backend = RequestHandler(data_dir)

    @classmethod
    def shared(cls, data_dir: str | os.PathLike[str] | None = None) -> EmbeddedTransport:
        """One embedded backend per data dir and process, so each base model is loaded once."""
        path = Path(data_dir or os.environ.get("TINKER_DATA_DIR") or default_data_dir()).resolve()
        with cls._shared_lock:
            if str(path) not in cls._shared:
                cls._shared[str(path)] = cls(path)
            return cls._shared[str(path)]

    async def call(self, request: Any) -> Any:
        outcome = await self.backend.handle_encoded(wire.encoder.encode(request), owner="local")
        if isinstance(outcome, wire.Failure):
            raise_failure(outcome)
        return wire.decode_response(type(request), outcome)

    async def aclose(self) -> None:
        """The shared backend outlives any one client; it stops with the process."""


def _too_big(call_id: int, size: int, how: str) -> wire.Failure:
    message = f"request: expected an encoded request within the server's size limit, got {size} bytes{how}"
    return wire.Failure(call_id, 413, message, "user")


def default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "tinker"


class WebSocketTransport:
    """One persistent WebSocket to ``{base_url}/native/v1/ws``; completions are pushed to us."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.url = base_url.rstrip("/") + "/native/v1/ws"
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self._max_frame_bytes: int | None = None  # the server's, from its handshake response
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[bytes, asyncio.Future[Any]]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    async def call(self, request: Any) -> Any:
        payload = wire.encoder.encode(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RATE_LIMIT_TIMEOUT_S
        while True:
            reply = await self._call_once(payload)
            if not (isinstance(reply, wire.Failure) and reply.status == 429 and loop.time() < deadline):
                break
            delay = min(reply.retry_after or _RETRY_AFTER_DEFAULT_S, _RETRY_AFTER_MAX_S)
            logger.info("rate limited (%s); sending %s again in %.1fs", reply.message, type(request).__name__, delay)
            await asyncio.sleep(delay)
        if isinstance(reply, wire.Failure):
            raise_failure(reply)
        return wire.decode_response(type(request), reply.payload)

    async def _call_once(self, payload: bytes) -> wire.Result | wire.Failure:
        call_id = next(self._ids)
        frame = wire.encoder.encode(wire.Submit(call_id, msgspec.Raw(payload)))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = (frame, done)
        try:
            ws = await self._connected()
            if self._max_frame_bytes is not None and len(frame) > self._max_frame_bytes:
                return _too_big(call_id, len(frame), f" (it accepts at most {self._max_frame_bytes})")
            await ws.send_bytes(frame)
            reply = await done
        except (aiohttp.ClientError, ConnectionError) as e:
            # A send on a dropping socket: the reader reconnects and re-sends pending frames.
            if not done.done():
                reply = await done
            else:
                raise APIConnectionError(f"connection to {self.url} failed: {e}") from e
        finally:
            self._pending.pop(call_id, None)
        return reply

    async def _connected(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is not None and not self._ws.closed:
            return self._ws
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._ws is None or self._ws.closed:
                await self._connect()
        assert self._ws is not None
        return self._ws

    async def _connect(self) -> None:
        if self._closed:
            raise APIConnectionError("the client is closed")
        if self._session is None:
            trace = aiohttp.TraceConfig()
            trace.on_request_end.append(self._note_frame_limit)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), trace_configs=[trace]
            )
        try:
            self._ws = await self._session.ws_connect(
                self.url, headers=self._headers, heartbeat=HEARTBEAT_S, max_msg_size=0
            )
        except aiohttp.WSServerHandshakeError as e:
            hint = " (a missing or invalid API key: pass api_key= or set TINKER_API_KEY)" if e.status == 401 else ""
            raise error_for_status(e.status, f"{self.url}: the server refused the connection with {e.status}{hint}") from e
        except (aiohttp.ClientError, OSError) as e:
            raise APIConnectionError(f"cannot connect to {self.url}: {e}") from e
        self._reader = asyncio.create_task(self._read(self._ws))

    async def _note_frame_limit(self, session: object, context: object, params: aiohttp.TraceRequestEndParams) -> None:
        limit = params.response.headers.get(_MAX_FRAME_HEADER)
        self._max_frame_bytes = int(limit) if limit and limit.isdigit() else None

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.BINARY:
                continue
            frame = wire.server_frame_decoder.decode(message.data)
            entry = self._pending.get(frame.call_id)
            if entry is not None and not entry[1].done():
                entry[1].set_result(frame)
        if ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
            self._fail_largest_pending()
        if not self._closed and self._pending:
            await self._reconnect_and_resend()

    def _fail_largest_pending(self) -> None:
        """The server closed the connection because a frame was over its size limit: fail the
        largest frame not yet answered (it or a larger one did it), and re-send the others."""
        waiting = [(len(frame), call_id, done) for call_id, (frame, done) in self._pending.items() if not done.done()]
        if waiting:
            size, call_id, done = max(waiting, key=lambda item: item[0])
            done.set_result(_too_big(call_id, size, " (the server closed the connection with 1009, message too big)"))

    async def _reconnect_and_resend(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_TIMEOUT_S
        delay = 0.2
        while True:
            try:
                await self._connect()
                break
            except TinkerError as e:
                if self._closed or loop.time() + delay > deadline:
                    for _, done in list(self._pending.values()):
                        if not done.done():
                            done.set_exception(APIConnectionError(f"lost connection to {self.url}: {e}"))
                    return
                logger.warning("connection to %s lost; retrying in %.1fs", self.url, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        assert self._ws is not None
        for frame, done in list(self._pending.values()):
            if not done.done():
                await self._ws.send_bytes(frame)

    async def aclose(self) -> None:
        """Close the connection; calls still waiting for an answer fail. Closing twice is harmless."""
        self._closed = True
        try:
            if self._ws is not None:
                await self._ws.close()
            if self._reader is not None:
                await asyncio.gather(self._reader, return_exceptions=True)
        finally:  # also when cancelled: an unclosed session warns at exit
            for _, done in list(self._pending.values()):
                if not done.done():
                    done.set_exception(APIConnectionError(f"{self.url}: the client was closed"))
            if self._session is not None:
                await self._session.close()
