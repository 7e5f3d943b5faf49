"""The web console: static pages at ``/console`` and the JSON they read under ``/console/api/``.

The pages (``console_static/``: one HTML file, one script, one style sheet; no build step, no
network) ask for an API key, keep it in the browser's ``sessionStorage`` and send it as
``X-API-Key`` with every call here, so every answer is scoped to that key's owner exactly as the
training API is: another owner's runs and checkpoints answer 404. The server page is for admin
owners only (``tinker-server --admin-owner``; on a server without keys, the single owner
``local`` is the admin). Curves are SVG drawn here (``charts``), from the run history.

Routes (all but the pages need a key):

* ``GET /console/api/me``: ``{owner, admin}``
* ``GET /console/api/runs``: the owner's runs with their step count, tokens and last loss
* ``GET /console/api/runs/{run_id}``: one run, its checkpoints and its history points
* ``GET /console/api/runs/{run_id}/charts``: its curves as SVG (loss, lr, grad norm, tokens/s)
* ``GET /console/api/checkpoints``: the owner's checkpoints
* ``POST /console/api/checkpoints/publish`` ``{path, published}``; ``/delete`` ``{path}``
* ``GET /console/api/checkpoints/archive?path=``: the checkpoint's files as one ``.tar``
* ``GET /console/api/samplers``: the owner's sampler sessions
* ``GET /console/api/server``: base models, adapters per tier, queues, memory (admin only)
"""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from tinker import wire
from tinker_backend import auth, charts
from tinker_backend.errors import ServiceError
from tinker_backend.store import CheckpointRecord, HistoryPoint, RunRecord

if TYPE_CHECKING:
    from tinker_backend.request_handler import RequestHandler

STATIC_DIR = Path(__file__).parent / "console_static"
ADMINS_KEY = web.AppKey("console_admins", frozenset)
_LIST_LIMIT = 1000  # rows per listing: the console is for looking, not for bulk export


class _PublishBody(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    published: bool


class _PathBody(msgspec.Struct, forbid_unknown_fields=True):
    path: str


def add_routes(app: web.Application, backend_key: web.AppKey[RequestHandler], admins: frozenset[str]) -> None:
    """Mount the console; ``admins`` are the owners who see the server page."""
    app[ADMINS_KEY] = admins
    routes = _Routes(backend_key)
    app.router.add_get("/console", routes.page)
    app.router.add_get("/console/", routes.page)
    app.router.add_static("/console/static", STATIC_DIR)
    app.router.add_get("/console/api/me", routes.me)
    app.router.add_get("/console/api/runs", routes.runs)
    app.router.add_get("/console/api/runs/{run_id}", routes.run)
    app.router.add_get("/console/api/runs/{run_id}/charts", routes.charts)
    app.router.add_get("/console/api/checkpoints", routes.checkpoints)
    app.router.add_post("/console/api/checkpoints/publish", routes.publish)
    app.router.add_post("/console/api/checkpoints/delete", routes.delete)
    app.router.add_get("/console/api/checkpoints/archive", routes.archive)
    app.router.add_get("/console/api/samplers", routes.samplers)
    app.router.add_get("/console/api/server", routes.server)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def _error(e: ServiceError) -> web.Response:
    return _json({"error": e.message}, e.status)


class _Routes:
    def __init__(self, backend_key: web.AppKey[RequestHandler]) -> None:
        self.backend_key = backend_key

    def _backend(self, request: web.Request) -> RequestHandler:
        return request.app[self.backend_key]

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def me(self, request: web.Request) -> web.Response:
        owner = auth.authenticate(request)
        return _json({"owner": owner, "admin": _is_admin(request, owner)})

    async def runs(self, request: web.Request) -> web.Response:
        backend, owner = self._backend(request), auth.authenticate(request)
        records, total = backend.store.list_runs(owner, _LIST_LIMIT, 0)
        last = backend.store.last_history([r.run_id for r in records]) if records else {}
        return _json({"runs": [_run_row(backend, r, last.get(r.run_id)) for r in records], "total": total})

    def _owned_run(self, request: web.Request) -> tuple[RequestHandler, RunRecord]:
        backend, owner = self._backend(request), auth.authenticate(request)
        run = backend.store.get_run(request.match_info["run_id"])
        if run is None or run.owner != owner:
            raise ServiceError(404, f"run_id: unknown training run {request.match_info['run_id']!r}")
        return backend, run

    async def run(self, request: web.Request) -> web.Response:
        try:
            backend, run = self._owned_run(request)
        except ServiceError as e:
            return _error(e)
        history = backend.store.history(run.run_id)
        return _json(
            {
                "run": _run_row(backend, run, history[-1] if history else None),
                "lora_config": run.lora_config,
                "checkpoints": [_checkpoint_row(c) for c in backend.store.list_checkpoints(run.run_id)],
                "history": history,
            }
        )

    async def charts(self, request: web.Request) -> web.Response:
        try:
            backend, run = self._owned_run(request)
        except ServiceError as e:
            return _error(e)
        history = backend.store.history(run.run_id)
        steps: list[float] = [p.step for p in history]
        return _json(
            {
                "points": len(history),
                "charts": {
                    "loss": charts.line_chart("loss per token", steps, [_loss(p) for p in history]),
                    "lr": charts.line_chart("learning rate", steps, [p.learning_rate for p in history]),
                    "grad_norm": charts.line_chart(
                        "gradient norm (before clipping)", steps, [p.grad_norm for p in history]
                    ),
                    "tokens_per_s": charts.line_chart(
                        "trained tokens per second", steps,
                        [p.tokens / p.step_seconds if p.step_seconds else None for p in history],
                    ),
                },
            }
        )

    async def checkpoints(self, request: web.Request) -> web.Response:
        backend, owner = self._backend(request), auth.authenticate(request)
        records, total = backend.store.list_user_checkpoints(owner, _LIST_LIMIT, 0)
        return _json({"checkpoints": [_checkpoint_row(c) for c in records], "total": total})

    async def publish(self, request: web.Request) -> web.Response:
        owner = auth.authenticate(request)
        try:
            body = msgspec.json.decode(await request.read(), type=_PublishBody)
        except msgspec.ValidationError as e:
            return _json({"error": f"body: {e}"}, 400)
        return await self._act(request, wire.PublishCheckpoint(tinker_path=body.path, published=body.published), owner)

    async def delete(self, request: web.Request) -> web.Response:
        owner = auth.authenticate(request)
        try:
            body = msgspec.json.decode(await request.read(), type=_PathBody)
        except msgspec.ValidationError as e:
            return _json({"error": f"body: {e}"}, 400)
        return await self._act(request, wire.DeleteCheckpoint(tinker_path=body.path), owner)

    async def _act(self, request: web.Request, action: wire.Request, owner: str) -> web.Response:
        """Run ``action`` through the request handler, as the training API would."""
        try:
            await self._backend(request).handle(action, owner)
        except ServiceError as e:
            return _error(e)
        return _json({"ok": True})

    async def archive(self, request: web.Request) -> web.Response:
        backend, owner = self._backend(request), auth.authenticate(request)
        path = request.query.get("path", "")
        try:
            record = backend.checkpoints.lookup(path, owner, owned=True)
        except ServiceError as e:
            return _error(e)
        body = await asyncio.to_thread(_tar, backend.checkpoints.directory(record))
        filename = f"{record.run_id}-{record.kind}-{record.name}.tar".replace(":", "_").replace("/", "_")
        return web.Response(
            body=body,
            content_type="application/x-tar",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    async def samplers(self, request: web.Request) -> web.Response:
        backend, owner = self._backend(request), auth.authenticate(request)
        rows = [
            {
                "sampler_id": s.sampler_id,
                "session_id": s.session_id,
                "base_model": s.base_model,
                "model_path": s.model_path,
                "created_at": s.created_at,
                "loaded": s.model_path is None or backend.samplers.is_loaded(s.sampler_id),
            }
            for s in backend.store.list_samplers(owner, _LIST_LIMIT)
        ]
        return _json({"samplers": rows})

    async def server(self, request: web.Request) -> web.Response:
        owner = auth.authenticate(request)
        if not _is_admin(request, owner):
            return _json({"error": "key: expected an admin key (tinker-server --admin-owner), got the key of " + repr(owner)}, 403)
        backend = self._backend(request)
        models = []
        for scheduler in backend.engines.schedulers():
            engine = scheduler.loaded_engine()
            stats = getattr(engine, "stats", None)
            models.append(
                {
                    "base_model": scheduler.base_model,
                    "loaded": engine is not None,
                    "runs": scheduler.run_count(),
                    "queue_depth": scheduler.queue_depth(),
                    **(stats() if callable(stats) else {}),
                }
            )
        return _json(
            {
                "models": models,
                "adapter_slots": backend.limits.adapter_slots,
                "sessions_live": backend.ledger.live_sessions(),
                "memory": _memory(),
            }
        )


def _is_admin(request: web.Request, owner: str) -> bool:
    return owner in request.app[ADMINS_KEY] or not request.app[auth.KEYRING_KEY].required()


def _loss(point: HistoryPoint) -> float | None:
    if point.loss_sum is None or point.weight_sum <= 0:
        return None
    return point.loss_sum / point.weight_sum


def _run_row(backend: RequestHandler, run: RunRecord, last: HistoryPoint | None) -> dict[str, Any]:
    scheduler = backend.engines.loaded(run.base_model)
    return {
        "run_id": run.run_id,
        "base_model": run.base_model,
        "rank": run.lora_config.get("rank"),
        "owner": run.owner,
        "steps": last.step if last else 0,
        "tokens": last.tokens_total if last else 0,
        "last_loss": _loss(last) if last else None,
        "state": "loaded" if scheduler is not None and scheduler.has_run(run.run_id) else "unloaded",
        "created_at": run.created_at,
        "last_activity": run.last_request_time,
    }


def _checkpoint_row(record: CheckpointRecord) -> dict[str, Any]:
    return {
        "path": record.tinker_path,
        "run_id": record.run_id,
        "kind": record.kind,
        "name": record.name,
        "size_bytes": record.size_bytes,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "published": record.published,
    }


def _tar(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                tar.add(file, arcname=str(file.relative_to(folder)))
    return buffer.getvalue()


def _memory() -> dict[str, int]:
    """This process's resident and peak memory in bytes (Linux ``/proc``; empty elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    fields = {"VmRSS": "rss_bytes", "VmHWM": "peak_rss_bytes"}
    found = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            found[fields[name]] = int(value.split()[0]) * 1024
    return found
