"""HTTP routes: health, and the native protocol over one WebSocket per client. No torch here."""

from __future__ import annotations

import asyncio
import logging
import weakref
from pathlib import Path

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from tinker import _wire
from tinker_backend.service import Backend

logger = logging.getLogger("tinker_backend.api")

BACKEND_KEY = web.AppKey("backend", Backend)
SOCKETS_KEY = web.AppKey("sockets", weakref.WeakSet)
# Largest native frame accepted (a forward_backward of many long sequences fits easily).
MAX_FRAME_BYTES = 256 * 1024 * 1024


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def native_ws(request: web.Request) -> web.WebSocketResponse:
    """Each binary message is a ``Submit``; each call is answered by one ``Result`` or ``Failure``.

    Calls run concurrently; a call whose client went away still completes (its answer is kept
    for de-duplication, so a reconnecting client that re-sends it gets the same answer).
    """
    backend = request.app[BACKEND_KEY]
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, heartbeat=30)
    await ws.prepare(request)
    request.app[SOCKETS_KEY].add(ws)
    owner = "local"
    tasks: set[asyncio.Task[None]] = set()

    async def answer(call_id: int, data: bytes) -> None:
        outcome = await backend.handle_encoded(data, owner)
        if isinstance(outcome, _wire.Failure):
            frame = _wire.encoder.encode(
                _wire.Failure(call_id, outcome.status, outcome.message, outcome.category)
            )
        else:
            frame = _wire.encoder.encode(_wire.Result(call_id, msgspec.Raw(outcome)))
        if not ws.closed:
            try:
                await ws.send_bytes(frame)
            except ConnectionError:
                logger.info("client went away before call %d was answered", call_id)

    async for message in ws:
        if message.type != WSMsgType.BINARY:
            continue
        try:
            submit = _wire.submit_decoder.decode(message.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            await ws.send_bytes(_wire.encoder.encode(_wire.Failure(0, 400, f"invalid frame: {e}", "user")))
            continue
        task = asyncio.create_task(answer(submit.call_id, bytes(submit.request)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return ws


def make_app(data_dir: Path, *, max_lora_rank: int = 256) -> web.Application:
    app = web.Application(client_max_size=MAX_FRAME_BYTES)
    backend_holder: dict[str, Backend] = {}

    async def start(app: web.Application) -> None:
        backend_holder["backend"] = Backend(data_dir, max_lora_rank=max_lora_rank)
        app[BACKEND_KEY] = backend_holder["backend"]

    async def close_sockets(app: web.Application) -> None:
        # Open WebSockets would otherwise hold a graceful shutdown until its timeout.
        for ws in list(app[SOCKETS_KEY]):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def stop(app: web.Application) -> None:
        backend_holder["backend"].close()

    app[SOCKETS_KEY] = weakref.WeakSet()
    app.on_startup.append(start)
    app.on_shutdown.append(close_sockets)
    app.on_cleanup.append(stop)
    app.router.add_get("/api/v1/healthz", healthz)
    app.router.add_get("/native/v1/ws", native_ws)
    return app
