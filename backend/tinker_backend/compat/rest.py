"""The official SDK's ``RestClient`` routes under ``/api/v1``: runs, checkpoints, sessions.

Each handler builds the native request (``tinker.wire``) and answers the native answer as JSON,
so both protocols share one implementation (``RequestHandler._dispatch_rest``). Signed URLs are
made absolute with the scheme and host the request came to (its ``Host`` header).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from tinker import wire
from tinker.types import GetSessionResponse
from tinker_backend import auth
from tinker_backend.compat.bodies import (
    Handler,
    PageQuery,
    TtlBody,
    WeightsInfoBody,
    convert,
    json_response,
    query_fields,
    read_body,
)

if TYPE_CHECKING:
    from tinker_backend.compat.routes import TinkerHttpApi


class RestRoutes:
    """The REST handlers of one app; native requests go through ``api._call``."""

    def __init__(self, api: TinkerHttpApi) -> None:
        self.api = api

    async def _rest(self, request: web.Request, native: Any) -> web.Response:
        return json_response(await self.api._call(native, auth.authenticate(request)))

    async def get_server_capabilities(self, request: web.Request) -> web.Response:
        return await self._rest(request, wire.GetServerCapabilities())

    async def list_training_runs(self, request: web.Request) -> web.Response:
        query = query_fields(request, "limit", "offset")
        return await self._rest(request, convert(wire.ListTrainingRuns, strict=False, **query))

    async def get_training_run(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        return await self._rest(request, convert(wire.GetTrainingRun, training_run_id=run_id))

    async def list_checkpoints(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        return await self._rest(request, convert(wire.ListCheckpoints, training_run_id=run_id))

    async def list_user_checkpoints(self, request: web.Request) -> web.Response:
        query = query_fields(request, "limit", "offset")
        return await self._rest(request, convert(wire.ListUserCheckpoints, strict=False, **query))

    async def delete_checkpoint(self, request: web.Request) -> web.Response:
        return await self._rest(request, convert(wire.DeleteCheckpoint, tinker_path=_tinker_path(request)))

    async def publish(self, request: web.Request) -> web.Response:
        """POST publishes, DELETE unpublishes."""
        native = convert(wire.PublishCheckpoint, tinker_path=_tinker_path(request), published=request.method == "POST")
        return await self._rest(request, native)

    async def set_checkpoint_ttl(self, request: web.Request) -> web.Response:
        ttl = (await read_body(request, TtlBody)).ttl_seconds
        native = convert(wire.SetCheckpointTtl, tinker_path=_tinker_path(request), ttl_seconds=ttl)
        return await self._rest(request, native)

    async def weights_info(self, request: web.Request) -> web.Response:
        path = (await read_body(request, WeightsInfoBody)).tinker_path
        return await self._rest(request, convert(wire.GetWeightsInfo, tinker_path=path))

    async def external_weights_urls(self, request: web.Request) -> web.Response:
        path = f"tinker://{request.match_info['run_id']}/external_weights/{request.match_info['name']}"
        base_url = str(request.url.origin())
        return await self._rest(request, convert(wire.GetExternalWeightsUrls, tinker_path=path, base_url=base_url))

    async def list_sessions(self, request: web.Request) -> web.Response:
        query = convert(PageQuery, strict=False, **query_fields(request, "limit", "offset"))
        return await self._rest(request, wire.ListSessions(limit=query.limit, offset=query.offset))

    async def get_session(self, request: web.Request) -> web.Response:
        """The store's record, with the display name the session was created with here (if any)."""
        owner = auth.authenticate(request)
        session_id = request.match_info["session_id"]
        answer: GetSessionResponse = await self.api._call(convert(wire.GetSession, session_id=session_id), owner)
        answer.display_name = self.api.sessions.display_name(session_id, owner)
        return json_response(answer)

    def routes(self) -> list[tuple[str, str, Handler]]:
        training_run = "/api/v1/training_runs/{run_id}"
        checkpoint = training_run + "/checkpoints/{kind}/{name}"
        return [
            ("GET", "/api/v1/get_server_capabilities", self.get_server_capabilities),
            ("GET", "/api/v1/training_runs", self.list_training_runs),
            ("GET", training_run, self.get_training_run),
            ("GET", training_run + "/checkpoints", self.list_checkpoints),
            ("DELETE", checkpoint, self.delete_checkpoint),
            ("POST", checkpoint + "/publish", self.publish),
            ("DELETE", checkpoint + "/publish", self.publish),
            ("PUT", checkpoint + "/ttl", self.set_checkpoint_ttl),
            (
                "GET",
                training_run + "/checkpoints/external_weights/{name}/external_weights_urls",
                self.external_weights_urls,
            ),
            ("GET", "/api/v1/checkpoints", self.list_user_checkpoints),
            ("POST", "/api/v1/weights_info", self.weights_info),
            ("GET", "/api/v1/sessions", self.list_sessions),
            ("GET", "/api/v1/sessions/{session_id}", self.get_session),
        ]


def _tinker_path(request: web.Request) -> str:
    info = request.match_info
    return f"tinker://{info['run_id']}/{info['kind']}/{info['name']}"
