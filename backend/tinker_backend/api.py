"""HTTP routes: health, and the native protocol over one WebSocket per client. No torch here.

Every route but health is authenticated (``auth.auth_middleware``); the owner of the key is
what the backend scopes every request to.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from pathlib import Path

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from tinker import wire
from tinker_backend import auth, console, files_api, metrics, openai_api
from tinker_backend.compat import add_routes as add_tinker_http_routes
from tinker_backend.limits import Limits
from tinker_backend.request_handler import RequestHandler
from tinker_backend.tenancy import KeyLimits
from tinker_backend.workers.config import Deployment

logger = logging.getLogger("tinker_backend.api")

BACKEND_KEY = web.AppKey("backend", RequestHandler)
SOCKETS_KEY: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("sockets")
MAX_REQUEST_BYTES_KEY = web.AppKey("max_request_bytes", int)
MAX_FRAME_HEADER = "X-Tinker-Max-Frame-Bytes"
# Largest native frame accepted (a forward_backward of many long sequences fits easily).
MAX_FRAME_BYTES = 256 * 1024 * 1024


async def healthz(request: web.Request) -> web.Response:
    backend = request.app.get(BACKEND_KEY)
    workers = backend.engines.health() if backend is not None else {}  # worker processes, if any
    return web.json_response({"status": "ok", **({"workers": workers} if workers else {})})


async def native_ws(request: web.Request) -> web.WebSocketResponse:
    """Each binary message is a ``Submit``; each call is answered by one ``Result`` or ``Failure``.

    Calls run concurrently; a call whose client went away still completes (its answer is kept
    for de-duplication, so a reconnecting client that re-sends it gets the same answer).
    """
    backend = request.app[BACKEND_KEY]
    owner = auth.authenticate(request)  # the handshake itself is refused with 401 without a key
    ws = web.WebSocketResponse(max_msg_size=request.app[MAX_REQUEST_BYTES_KEY], heartbeat=30)
    # A larger frame makes aiohttp close the connection (1009); clients check the limit first.
    ws.headers[MAX_FRAME_HEADER] = str(request.app[MAX_REQUEST_BYTES_KEY])
    await ws.prepare(request)
    request.app[SOCKETS_KEY].add(ws)
    tasks: set[asyncio.Task[None]] = set()

    async def answer(call_id: int, data: bytes) -> None:
        outcome = await backend.handle_encoded(data, owner)
        if isinstance(outcome, wire.Failure):
            frame = wire.encoder.encode(msgspec.structs.replace(outcome, call_id=call_id))
        else:
            frame = wire.encoder.encode(wire.Result(call_id, msgspec.Raw(outcome)))
        if not ws.closed:
            try:
                await ws.send_bytes(frame)
            except ConnectionError:
                logger.info("client went away before call %d was answered", call_id)

    async for message in ws:
        if message.type == WSMsgType.ERROR:  # e.g. a frame over the size limit: aiohttp closes with 1009
            logger.warning("closing a native connection of %s: %s", owner, message.data)
            continue
        if message.type != WSMsgType.BINARY:
            continue
        try:
            submit = wire.submit_decoder.decode(message.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            await ws.send_bytes(wire.encoder.encode(wire.Failure(0, 400, f"invalid frame: {e}", "user")))
            continue
        if not auth.still_valid(request):  # revoked while connected
            failure = wire.Failure(submit.call_id, 401, "X-API-Key: the key of this connection was revoked", "user")
            await ws.send_bytes(wire.encoder.encode(failure))
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"API key revoked")
            break
        task = asyncio.create_task(answer(submit.call_id, bytes(submit.request)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return ws


def make_app(
    data_dir: Path,
    *,
    limits: Limits | None = None,
    api_keys: tuple[str, ...] = (),
    keys_file: Path | None = None,
    key_limits: KeyLimits | None = None,
    session_timeout_s: float | None = None,
    allow_local_models: bool = True,
    max_request_bytes: int = MAX_FRAME_BYTES,
    sampler: str | None = None,
    admin_owners: tuple[str, ...] = (),
    deployment: Deployment | None = None,
) -> web.Application:
    """The server's app. Keys: ``api_keys``, ``keys_file`` and the store's table (``auth``);
    per-key limits and session expiry: ``tenancy``; ``max_request_bytes``: per native frame
    and per HTTP body; ``sampler``: the sampling engine (``RequestHandler``); ``admin_owners``:
    who sees the console's server page (``console``); ``deployment``: where each base model's
    trainer runs (``workers``)."""
    app = web.Application(
        client_max_size=max_request_bytes, middlewares=[metrics.middleware(BACKEND_KEY), auth.auth_middleware]
    )
    backend_holder: dict[str, RequestHandler] = {}

    async def start(app: web.Application) -> None:
        backend_holder["backend"] = RequestHandler(
            data_dir,
            limits=limits,
            key_limits=key_limits,
            session_timeout_s=session_timeout_s,
            allow_local_models=allow_local_models,
            sampler=sampler,
            deployment=deployment,
        )
        app[BACKEND_KEY] = backend_holder["backend"]
        app[auth.KEYRING_KEY] = auth.KeyRing(backend_holder["backend"].store, api_keys, keys_file)

    async def close_sockets(app: web.Application) -> None:
        # Open WebSockets would otherwise hold a graceful shutdown until its timeout.
        for ws in list(app[SOCKETS_KEY]):  # type: ignore[index]  # aiohttp's stubs reject WeakSet keys
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def stop(app: web.Application) -> None:
        backend_holder["backend"].close()

    app[SOCKETS_KEY] = weakref.WeakSet()
    app[MAX_REQUEST_BYTES_KEY] = max_request_bytes
    app.on_startup.append(start)
    app.on_shutdown.append(close_sockets)
    app.on_cleanup.append(stop)
    app.router.add_get("/api/v1/healthz", healthz)
    app.router.add_get("/native/v1/ws", native_ws)
    add_tinker_http_routes(app, BACKEND_KEY)
    openai_api.add_routes(app, BACKEND_KEY)  # /v1/models, /v1/completions, /v1/chat/completions
    files_api.add_routes(app, BACKEND_KEY)  # signed checkpoint-file downloads
    metrics.add_routes(app, BACKEND_KEY)  # /metrics (Prometheus)
    console.add_routes(app, BACKEND_KEY, frozenset(admin_owners))  # /console and its JSON
    return app
