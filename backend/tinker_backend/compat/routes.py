"""The public Tinker HTTP protocol under ``/api/v1``: a translation layer onto ``RequestHandler.handle``.

Each route decodes the official SDK's request (JSON; protobuf for ``forward_backward``),
builds the native request of ``tinker.wire`` (validated by msgspec exactly as on the native
wire) and either answers at once or, for long-running calls, starts it in the future table
and answers ``{request_id}``; ``retrieve_future`` then long-polls for the answer. Errors are
``{"error", "category"}`` with an HTTP status, and name the field at fault.

Settings come from ``TINKER_COMPAT_*`` environment variables (see :class:`Config`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from tinker import wire
from tinker.types import ForwardBackwardOutput, GetInfoResponse, LoadWeightsResponse, SampleResponse
from tinker.validation import check_num_samples
from tinker_backend import auth, model_registry
from tinker_backend.compat import proto
from tinker_backend.compat.bodies import (
    CreateModelBody,
    CreateSamplingSessionBody,
    CreateSessionBody,
    Handler,
    LoadWeightsBody,
    ModelBody,
    OptimStepBody,
    RetrieveFutureBody,
    SampleBody,
    SaveWeightsBody,
    SessionBody,
    convert,
    error_body,
    errors_as_json,
    json_response,
    on_loopback,
    only_last,
    plain,
    read_body,
)
from tinker_backend.compat.futures import Entry, FutureTable
from tinker_backend.compat.rest import RestRoutes
from tinker_backend.compat.sessions import Session, Sessions
from tinker_backend.errors import ServiceError

if TYPE_CHECKING:
    from tinker_backend.request_handler import RequestHandler

logger = logging.getLogger("tinker_backend.compat")



@dataclasses.dataclass(frozen=True)
class Config:
    """Protocol settings; each can be set with ``TINKER_COMPAT_<NAME>``, e.g. ``TINKER_COMPAT_LONG_POLL_S=1``."""

    # How long retrieve_future holds a poll before answering "try_again". The SDK re-polls at
    # once and its poll timeout is 45 s, so ~30 s keeps idle clients quiet and safe.
    long_poll_s: float = 30.0
    # How long an answer is kept after it is ready; polling later gets 410 ("expired").
    result_ttl_s: float = 600.0
    # Larger answers are first announced with "complete_metadata", so the SDK can budget memory.
    inline_result_bytes: int = 1 << 20
    # Sent to the SDK in client/config: the most datums per forward_backward request.
    fwdbwd_max_chunk_len: int = 1024
    # Ask the SDK to zstd-compress forward_backward bodies (only if this server can decode zstd).
    compress_fwdbwd: bool = False

    @classmethod
    def from_env(cls) -> Config:
        parse: dict[str, Callable[[str], float | int | bool]] = {
            "float": float,
            "int": int,
            "bool": lambda raw: raw.lower() in ("1", "true", "yes"),
        }
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = os.environ.get(f"TINKER_COMPAT_{field.name.upper()}")
            if raw is not None:
                values[field.name] = parse[str(field.type)](raw)
        return cls(**values)


def owner_of(request: web.Request) -> str:
    """Who is calling: the owner of the request's API key (401 without a valid one)."""
    return auth.authenticate(request)


# --- the routes ----------------------------------------------------------------------------------


class TinkerHttpApi:
    """The handlers of one app; the backend is looked up on the app (it starts with the app)."""

    def __init__(self, app: web.Application, backend_key: web.AppKey[RequestHandler], config: Config) -> None:
        self._app = app
        self._backend_key = backend_key
        self.config = config
        self.futures = FutureTable(config.result_ttl_s)
        self.sessions = Sessions()

    @property
    def backend(self) -> RequestHandler:
        return self._app[self._backend_key]

    async def _call(self, native: Any, owner: str, finish: Callable[[Any], Any] | None = None) -> Any:
        """Run one native request; ``finish`` turns its answer into this protocol's."""
        try:
            result = await self.backend.handle(native, owner)
        except ServiceError:
            raise
        except Exception as e:
            logger.exception("%s failed", type(native).__name__)
            raise ServiceError(500, f"{type(e).__name__}: {e}") from e
        return result if finish is None else finish(result)

    def _start(
        self,
        owner: str,
        request_id: str,
        build: Callable[[], Any],
        finish: Callable[[Any], Any] | None = None,
    ) -> None:
        """Start the native request ``build()`` as ``request_id``, unless it is already known: a
        re-sent submit (the SDK retries submits) is answered with the first one's request id.
        Over a per-key limit it is not started but refused with a 429, which the SDK retries."""
        if (owner, request_id) in self.futures:
            return
        native = build()
        self.backend.check_admission(native, owner)
        self.backend.store.add_future(request_id, owner)  # so that a restart can tell "lost" from "unknown"

        async def run() -> Any:
            try:
                return await self._call(native, owner, finish)
            finally:
                self.backend.store.finish_future(request_id)

        self.futures.submit(owner, request_id, run)

    def _start_ordered(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        request_type: type,
        fields: Callable[[], dict[str, Any]],
        finish: Callable[[Any], Any] | None = None,
    ) -> web.Response:
        """Start request ``seq_id`` of run ``model_id``. If it cannot be built, it is a 400 now
        and still takes its seq_id in the run's order, so later requests do not wait on a gap."""

        def build() -> Any:
            try:
                return convert(request_type, model_id=model_id, seq_id=seq_id, **fields())
            except ServiceError as e:
                self.backend.reject_ordered(model_id, seq_id, owner, e)
                raise

        self._start(owner, f"{model_id}/{seq_id}", build, finish)
        return json_response({"request_id": f"{model_id}/{seq_id}", "model_id": model_id})

    # --- start-up and sessions ---

    async def client_config(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "fwdbwd_max_chunk_len": self.config.fwdbwd_max_chunk_len,
                "proto_compress_fwdbwd": self.config.compress_fwdbwd and _zstd_bodies_supported(),
            }
        )

    async def client_dynamic_config(self, request: web.Request) -> web.Response:
        return json_response({})

    async def telemetry(self, request: web.Request) -> web.Response:
        return json_response({"status": "accepted"})

    async def create_session(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await read_body(request, CreateSessionBody)
        metadata = {key: str(value) for key, value in (body.user_metadata or {}).items()}
        created = await self._call(convert(wire.CreateSession, user_metadata=metadata), owner)
        self.sessions.add(created.session_id, Session(owner, body.display_name))
        return json_response({"type": "create_session", "session_id": created.session_id})

    async def session_heartbeat(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        session_id = (await read_body(request, SessionBody)).session_id
        if self.sessions.finished(session_id, owner):  # a 410 stops the SDK's heartbeat loop
            raise ServiceError(410, f"session_id: session {session_id!r} has finished")
        await self._call(wire.Heartbeat(session_id=session_id), owner)  # keeps the session's runs loaded
        return json_response({"type": "session_heartbeat"})

    async def finish_session(self, request: web.Request) -> web.Response:
        self.sessions.get(request.match_info["session_id"], owner_of(request)).finished = True
        return json_response({})

    # --- training ---

    async def create_model(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await read_body(request, CreateModelBody)
        if body.lora_config is None:
            raise ServiceError(
                400, "lora_config: expected a LoRA config (this server trains LoRA adapters only), got none"
            )
        if (body.optimizer_config or {}).get("type", "adamw") != "adamw":
            raise ServiceError(
                400,
                f"optimizer_config: expected type 'adamw' (the one optimizer here), got {body.optimizer_config}",
            )
        model_id = f"{body.session_id}:train:{body.model_seq_id}"

        def created(result: wire.ModelCreated) -> dict[str, str]:
            return {"model_id": result.model_id, "type": "create_model"}

        self._start(
            owner,
            f"{model_id}/0",
            lambda: convert(
                wire.CreateModel,
                session_id=body.session_id,
                model_seq_id=body.model_seq_id,
                base_model=body.base_model,
                lora_config=body.lora_config,
                user_metadata={key: str(value) for key, value in (body.user_metadata or {}).items()},
            ),
            created,
        )
        return json_response({"request_id": f"{model_id}/0", "model_id": model_id})

    async def get_info(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await read_body(request, ModelBody)
        info: GetInfoResponse = await self._call(convert(wire.GetInfo, model_id=body.model_id), owner)
        if on_loopback(request):
            info = await _with_local_tokenizer(info)
        return json_response(info)

    async def forward_backward(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        message = proto.parse_forward_backward(await request.read())
        return self._start_ordered(
            owner,
            message.model_id,
            message.seq_id,
            wire.ForwardBackward,
            lambda: proto.forward_backward_fields(message),
        )

    async def optim_step(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await read_body(request, OptimStepBody)

        def fields() -> dict[str, Any]:
            if body.adam_params is None:
                raise ServiceError(
                    400,
                    "adam_params: expected AdamParams (AdamW is the one optimizer here), got "
                    f"optimizer_params={body.optimizer_params}",
                )
            return {"adam_params": body.adam_params}

        return self._start_ordered(owner, body.model_id, body.seq_id, wire.OptimStep, fields)

    async def save_weights(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await read_body(request, SaveWeightsBody)

        def fields() -> dict[str, Any]:
            if body.path is None:
                raise ServiceError(400, "path: expected the checkpoint's name, got none")
            return {"name": body.path, "ttl_seconds": body.ttl_seconds}

        return self._start_ordered(owner, body.model_id, body.seq_id, wire.SaveState, fields)

    async def save_weights_for_sampler(self, request: web.Request) -> web.Response:
        """Named: a ``sampler_weights`` checkpoint. Unnamed: a sampler snapshot whose id comes from
        the session's sampler counter. A re-sent unnamed submit carries a new counter value under
        the same seq_id, and is answered with the first one's sampler. ``kind="inflight"`` is
        served as a snapshot, which its contract allows (a sampler may keep the weights it has)."""
        owner = owner_of(request)
        body = await read_body(request, SaveWeightsBody)

        def fields() -> dict[str, Any]:
            if body.path is not None:
                return {"name": body.path, "ttl_seconds": body.ttl_seconds}
            if body.sampling_session_seq_id is None:
                raise ServiceError(400, "path, sampling_session_seq_id: expected one of them, got neither")
            session_id = body.model_id.split(":train:")[0]
            return {"sampling_session_id": f"{session_id}:sample:{body.sampling_session_seq_id}"}

        return self._start_ordered(owner, body.model_id, body.seq_id, wire.SaveWeightsForSampler, fields)

    async def save_weights_external(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await read_body(request, SaveWeightsBody)

        def fields() -> dict[str, Any]:
            if body.path is None:
                raise ServiceError(400, "path: expected the checkpoint's name, got none")
            if body.age_encryption_recipients:
                raise ServiceError(
                    400, "age_encryption_recipients: expected none (this server does not encrypt exports), got "
                    f"{body.age_encryption_recipients}"
                )
            return {"name": body.path, "ttl_seconds": body.ttl_seconds}

        return self._start_ordered(owner, body.model_id, body.seq_id, wire.SaveWeightsExternal, fields)

    async def load_weights(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await read_body(request, LoadWeightsBody)
        if body.model_id is not None and body.seq_id is not None:
            fields = {"path": body.path, "with_optimizer": body.optimizer}
            return self._start_ordered(owner, body.model_id, body.seq_id, wire.LoadState, lambda: fields)
        if body.session_id is None or body.model_seq_id is None:
            raise ServiceError(
                400,
                "session_id, model_seq_id, model_id, seq_id: expected session_id and model_seq_id (a new "
                "run) or model_id and seq_id (an existing run)",
            )
        model_id = f"{body.session_id}:train:{body.model_seq_id}"

        def loaded(result: wire.ModelCreated) -> LoadWeightsResponse:
            return LoadWeightsResponse(path=body.path)

        self._start(
            owner,
            f"{model_id}/0",
            lambda: convert(
                wire.CreateModelFromState,
                session_id=body.session_id,
                model_seq_id=body.model_seq_id,
                path=body.path,
                with_optimizer=body.optimizer,
            ),
            loaded,
        )
        return json_response({"request_id": f"{model_id}/0", "model_id": model_id})

    # --- sampling ---

    async def create_sampling_session(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await read_body(request, CreateSamplingSessionBody)
        sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        native = convert(
            wire.CreateSamplingSession,
            sampling_session_id=sampler_id,
            model_path=body.model_path,
            base_model=body.base_model,
        )
        await self._call(native, owner)
        return json_response({"type": "create_sampling_session", "sampling_session_id": sampler_id})

    async def get_sampler(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        native = convert(wire.GetSampler, sampling_session_id=request.match_info["sampler_id"])
        sampler: wire.SamplingSessionCreated = await self._call(native, owner)
        # Samplers made by save_weights_and_get_sampling_client have no checkpoint path.
        path = sampler.model_path if (sampler.model_path or "").startswith("tinker://") else None
        return json_response(
            {"sampler_id": sampler.sampling_session_id, "base_model": sampler.base_model, "model_path": path}
        )

    async def asample(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await read_body(request, SampleBody)
        unsupported = {
            "topk_sample_logprobs": body.topk_sample_logprobs != 0,
            "target_prompt_logprobs": body.target_prompt_logprobs is not None,
            "prompt_alt_tokens_k": body.prompt_alt_tokens_k != 0,
        }
        for name, asked in unsupported.items():
            if asked:
                raise ServiceError(400, f"{name}: not supported by this server (leave it at its default)")
        check_num_samples(body.num_samples)  # now: the sequence ids below are listed before it runs
        request_id = f"{body.sampling_session_id}/{body.seq_id}"

        def build() -> wire.Sample:
            native = convert(
                wire.Sample,
                sampling_session_id=body.sampling_session_id,
                seq_id=body.seq_id,
                prompt=body.prompt,
                num_samples=body.num_samples,
                sampling_params=body.sampling_params,
                include_prompt_logprobs=bool(body.prompt_logprobs) or body.topk_prompt_logprobs > 0,
                topk_prompt_logprobs=body.topk_prompt_logprobs,
                record_stability_info=bool(body.record_stability_info),
            )
            last_n = body.prompt_logprobs_last_n
            if last_n is not None and not (
                native.include_prompt_logprobs and 1 <= last_n < native.prompt.length
            ):
                raise ServiceError(
                    400,
                    f"prompt_logprobs_last_n: expected 1 to len(prompt) - 1 = {native.prompt.length - 1}, "
                    f"with prompt_logprobs=true; got {last_n}",
                )
            return native

        self._start(
            owner, request_id, build, lambda response: only_last(response, body.prompt_logprobs_last_n)
        )
        sequence_ids = [f"{request_id}/{i}" for i in range(body.num_samples)]
        return json_response({"request_id": request_id, "sample_sequence_ids": sequence_ids})

    # --- futures ---

    async def unsupported(self, request: web.Request) -> web.Response:
        raise ServiceError(
            404, f"{request.method} {request.path}: not supported by this server (see docs/compat.md)"
        )

    async def retrieve_future(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await read_body(request, RetrieveFutureBody)
        entry = await self.futures.wait(owner, body.request_id, self.config.long_poll_s)
        if entry is None:
            raise ServiceError(410, self._gone(body.request_id, owner))
        if not entry.task.done():
            return json_response({"type": "try_again", "request_id": body.request_id, "queue_state": "active"})
        error = entry.task.exception()
        if error is not None:
            assert isinstance(error, ServiceError)  # _call raises nothing else
            return json_response(error_body(error))
        content_type = self._encode(entry, "application/x-protobuf" in request.headers.get("Accept", ""))
        payload = entry.encoded[content_type]
        if body.allow_metadata_only and len(payload) > self.config.inline_result_bytes:
            return json_response({"status": "complete_metadata", "response_payload_size": len(payload)})
        return web.Response(body=payload, content_type=content_type)

    def _gone(self, request_id: str, owner: str) -> str:
        """Why there is no answer for ``request_id`` (always a 410: the SDK re-sends samples)."""
        state = self.backend.store.future_state(request_id, owner)
        if state == "lost":
            return f"request_id: request {request_id!r} was lost (the server restarted while it ran); send it again"
        if state is not None:
            return f"request_id: the answer of {request_id!r} has expired (answers are kept {self.config.result_ttl_s:g} s)"
        return f"request_id: unknown request {request_id!r}"

    @staticmethod
    def _encode(entry: Entry, protobuf: bool) -> str:
        """Encode the entry's answer (once per content type); returns the content type used.
        The SDK asks for protobuf for forward_backward and sample results, JSON for the rest."""
        result = entry.task.result()
        encode: Callable[[Any], bytes]
        if protobuf and isinstance(result, ForwardBackwardOutput):
            content_type, encode = "application/x-protobuf", proto.encode_forward_backward_output
        elif protobuf and isinstance(result, SampleResponse):
            content_type, encode = "application/x-protobuf", proto.encode_sample_response
        else:
            content_type, encode = "application/json", lambda value: msgspec.json.encode(plain(value))
        if content_type not in entry.encoded:
            entry.encoded[content_type] = encode(result)
        return content_type

async def _with_local_tokenizer(info: GetInfoResponse) -> GetInfoResponse:
    """Point ``tokenizer_id`` at the model's folder on this machine, so that the SDK's
    ``get_tokenizer()`` (``AutoTokenizer.from_pretrained(tokenizer_id)``) works offline.
    Only for clients on this machine: elsewhere the folder does not exist."""
    try:
        folder = await asyncio.to_thread(model_registry.resolve_model, info.model_data.model_name or "")
    except model_registry.UnknownModelError:
        return info
    return msgspec.structs.replace(
        info, model_data=msgspec.structs.replace(info.model_data, tokenizer_id=str(folder))
    )


def _zstd_bodies_supported() -> bool:
    """aiohttp decodes ``Content-Encoding: zstd`` request bodies with ``backports.zstd``
    (``compression.zstd`` from Python 3.14)."""
    from aiohttp import compression_utils

    return bool(compression_utils.HAS_ZSTD)


def add_routes(app: web.Application, backend_key: web.AppKey[RequestHandler]) -> None:
    """Serve the public Tinker HTTP protocol on ``app``, next to the native protocol."""
    api = TinkerHttpApi(app, backend_key, Config.from_env())
    routes: list[tuple[str, str, Handler]] = [
        ("POST", "/api/v1/client/config", api.client_config),
        ("POST", "/api/v1/client/dynamic_config", api.client_dynamic_config),
        ("POST", "/api/v1/telemetry", api.telemetry),
        ("POST", "/api/v1/create_session", api.create_session),
        ("POST", "/api/v1/session_heartbeat", api.session_heartbeat),
        ("POST", "/api/v1/sessions/{session_id}/finish", api.finish_session),
        ("POST", "/api/v1/create_model", api.create_model),
        ("POST", "/api/v1/get_info", api.get_info),
        ("POST", "/api/v1/forward_backward", api.forward_backward),
        ("POST", "/api/v1/optim_step", api.optim_step),
        ("POST", "/api/v1/save_weights", api.save_weights),
        ("POST", "/api/v1/save_weights_for_sampler", api.save_weights_for_sampler),
        ("POST", "/api/v1/save_weights_external", api.save_weights_external),
        ("POST", "/api/v1/load_weights", api.load_weights),
        ("POST", "/api/v1/create_sampling_session", api.create_sampling_session),
        ("GET", "/api/v1/samplers/{sampler_id}", api.get_sampler),
        ("POST", "/api/v1/asample", api.asample),
        ("POST", "/api/v1/retrieve_future", api.retrieve_future),
        *RestRoutes(api).routes(),
        # Known routes this server does not serve, answered with a clear message.
        ("POST", "/api/v1/copy_weights", api.unsupported),
        ("PUT", "/api/v1/sessions/{session_id}/project", api.unsupported),
        ("GET", "/api/v1/sessions/{session_id}/trace_export", api.unsupported),
        ("POST", "/api/v1/sessions/search", api.unsupported),
        ("GET", "/api/v1/audit", api.unsupported),
        ("GET", "/api/v1/billing/usage/events", api.unsupported),
        ("GET", "/api/v1/billing/usage/checkpoints/current", api.unsupported),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, errors_as_json(handler))

    async def release_long_polls(app: web.Application) -> None:
        api.futures.close()

    app.on_shutdown.append(release_long_polls)
