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
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from aiohttp import web

from tinker import wire
from tinker.types import ForwardBackwardOutput, GetInfoResponse, LoadWeightsResponse, SampleResponse
from tinker_backend import auth, model_registry
from tinker_backend.compat import proto
from tinker_backend.compat.futures import Entry, FutureTable
from tinker_backend.compat.sessions import Session, Sessions
from tinker_backend.errors import ServiceError
from tinker_backend.tenancy import RateLimited

if TYPE_CHECKING:
    from tinker_backend.request_handler import RequestHandler

logger = logging.getLogger("tinker_backend.compat")

T = TypeVar("T")
_MAX_NUM_SAMPLES = 128
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        parse = {"float": float, "int": int, "bool": lambda raw: raw.lower() in ("1", "true", "yes")}
        values = {}
        for field in dataclasses.fields(cls):
            raw = os.environ.get(f"TINKER_COMPAT_{field.name.upper()}")
            if raw is not None:
                values[field.name] = parse[str(field.type)](raw)
        return cls(**values)


def owner_of(request: web.Request) -> str:
    """Who is calling: the owner of the request's API key (401 without a valid one)."""
    return auth.authenticate(request)


# --- JSON request bodies (unknown fields, such as the SDK's "type", are ignored) --------------


class _Body(msgspec.Struct):
    pass


class CreateSessionBody(_Body):
    user_metadata: dict[str, Any] | None = None
    display_name: str | None = None


class SessionBody(_Body):
    session_id: str


class CreateModelBody(_Body):
    session_id: str
    model_seq_id: int
    base_model: str
    lora_config: dict[str, Any] | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: dict[str, Any] | None = None


class ModelBody(_Body):
    model_id: str


class OptimStepBody(_Body):
    model_id: str
    seq_id: int
    adam_params: dict[str, Any] | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeightsBody(_Body):
    model_id: str
    seq_id: int
    path: str | None = None  # the checkpoint's name
    ttl_seconds: int | None = None
    sampling_session_seq_id: int | None = None  # save_weights_for_sampler without a name


class LoadWeightsBody(_Body):
    path: str
    optimizer: bool
    session_id: str | None = None  # with model_seq_id: a new run, created from the checkpoint
    model_seq_id: int | None = None
    model_id: str | None = None  # with seq_id: load into an existing run
    seq_id: int | None = None


class CreateSamplingSessionBody(_Body):
    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


class SampleBody(_Body):
    sampling_session_id: str
    seq_id: int
    prompt: dict[str, Any]
    sampling_params: dict[str, Any]
    num_samples: int = 1
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None
    # Not supported here; a request that asks for them is refused.
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: Any = None
    prompt_alt_tokens_k: int = 0
    record_stability_info: bool | None = None


class RetrieveFutureBody(_Body):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfoBody(_Body):
    tinker_path: str


class TtlBody(_Body):
    ttl_seconds: int | None


class PageQuery(_Body):
    limit: int = 20
    offset: int = 0


# --- helpers -------------------------------------------------------------------------------------


async def _body(request: web.Request, body_type: type[T]) -> T:
    try:
        return msgspec.json.decode(await request.read(), type=body_type)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ServiceError(400, f"body: {e}") from e


def _convert(request_type: type[T], *, strict: bool = True, **fields: Any) -> T:
    """``fields`` as a ``request_type`` (a native request, usually), validated by msgspec as on
    the native wire; a bad field is a 400 naming it. ``strict=False`` parses query strings."""
    try:
        return msgspec.convert(fields, request_type, strict=strict)
    except msgspec.ValidationError as e:
        raise ServiceError(400, str(e)) from e


def _query(request: web.Request, *names: str) -> dict[str, str]:
    return {name: request.query[name] for name in names if name in request.query}


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready builtins with every field, defaults included: the SDK's models
    require fields (``is_lora``, say) that our Structs leave out when they hold their default."""
    if isinstance(value, msgspec.Struct):
        return {name: _plain(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(_plain(value)), status=status, content_type="application/json"
    )


def _error(error: ServiceError) -> dict[str, str]:
    return {"error": error.message, "category": error.category}


def _errors_as_json(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except RateLimited as e:  # the SDK waits this long, then sends the request again
            response = _json(_error(e), status=e.status)
            response.headers["Retry-After-Ms"] = str(int(e.retry_after * 1000))
            return response
        except ServiceError as e:
            return _json(_error(e), status=e.status)

    return wrapped


def _only_last(response: SampleResponse, n: int | None) -> SampleResponse:
    """Keep the prompt logprobs of the last ``n`` prompt tokens only (``prompt_logprobs_last_n``)."""
    if n is None:
        return response

    def cut(values: list[Any] | None) -> list[Any] | None:
        return None if values is None else [None] * (len(values) - n) + values[len(values) - n :]

    return msgspec.structs.replace(
        response,
        prompt_logprobs=cut(response.prompt_logprobs),
        topk_prompt_logprobs=cut(response.topk_prompt_logprobs),
    )


def _on_loopback(request: web.Request) -> bool:
    return request.remote in ("127.0.0.1", "::1")


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
                return _convert(request_type, model_id=model_id, seq_id=seq_id, **fields())
            except ServiceError as e:
                self.backend.reject_ordered(model_id, seq_id, owner, e)
                raise

        self._start(owner, f"{model_id}/{seq_id}", build, finish)
        return _json({"request_id": f"{model_id}/{seq_id}", "model_id": model_id})

    # --- start-up and sessions ---

    async def client_config(self, request: web.Request) -> web.Response:
        return _json(
            {
                "fwdbwd_max_chunk_len": self.config.fwdbwd_max_chunk_len,
                "proto_compress_fwdbwd": self.config.compress_fwdbwd and _zstd_bodies_supported(),
            }
        )

    async def client_dynamic_config(self, request: web.Request) -> web.Response:
        return _json({})

    async def telemetry(self, request: web.Request) -> web.Response:
        return _json({"status": "accepted"})

    async def create_session(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await _body(request, CreateSessionBody)
        metadata = {key: str(value) for key, value in (body.user_metadata or {}).items()}
        created = await self._call(_convert(wire.CreateSession, user_metadata=metadata), owner)
        self.sessions.add(created.session_id, Session(owner, metadata, body.display_name))
        return _json({"type": "create_session", "session_id": created.session_id})

    async def session_heartbeat(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        session_id = (await _body(request, SessionBody)).session_id
        if self.sessions.finished(session_id, owner):  # a 410 stops the SDK's heartbeat loop
            raise ServiceError(410, f"session_id: session {session_id!r} has finished")
        await self._call(wire.Heartbeat(session_id=session_id), owner)  # keeps the session's runs loaded
        return _json({"type": "session_heartbeat"})

    async def finish_session(self, request: web.Request) -> web.Response:
        self.sessions.get(request.match_info["session_id"], owner_of(request)).finished = True
        return _json({})

    async def list_sessions(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        query = _convert(PageQuery, strict=False, **_query(request, "limit", "offset"))
        return _json({"sessions": self.sessions.list(owner)[query.offset : query.offset + query.limit]})

    async def get_session(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["session_id"], owner_of(request))
        return _json(
            {
                "training_run_ids": session.training_run_ids,
                "sampler_ids": session.sampler_ids,
                "user_metadata": session.user_metadata or None,
                "display_name": session.display_name,
            }
        )

    # --- training ---

    async def create_model(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await _body(request, CreateModelBody)
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
            self.sessions.record_run(result.model_id, owner)
            return {"model_id": result.model_id, "type": "create_model"}

        self._start(
            owner,
            f"{model_id}/0",
            lambda: _convert(
                wire.CreateModel,
                session_id=body.session_id,
                model_seq_id=body.model_seq_id,
                base_model=body.base_model,
                lora_config=body.lora_config,
                user_metadata={key: str(value) for key, value in (body.user_metadata or {}).items()},
            ),
            created,
        )
        return _json({"request_id": f"{model_id}/0", "model_id": model_id})

    async def get_info(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await _body(request, ModelBody)
        info: GetInfoResponse = await self._call(_convert(wire.GetInfo, model_id=body.model_id), owner)
        if _on_loopback(request):
            info = await _with_local_tokenizer(info)
        return _json(info)

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
        body = await _body(request, OptimStepBody)

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
        body = await _body(request, SaveWeightsBody)

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
        body = await _body(request, SaveWeightsBody)

        def fields() -> dict[str, Any]:
            if body.path is not None:
                return {"name": body.path, "ttl_seconds": body.ttl_seconds}
            if body.sampling_session_seq_id is None:
                raise ServiceError(400, "path, sampling_session_seq_id: expected one of them, got neither")
            session_id = body.model_id.split(":train:")[0]
            return {"sampling_session_id": f"{session_id}:sample:{body.sampling_session_seq_id}"}

        def saved(result: Any) -> Any:
            if result.sampling_session_id is not None:
                self.sessions.record_sampler(result.sampling_session_id, owner)
            return result

        return self._start_ordered(
            owner, body.model_id, body.seq_id, wire.SaveWeightsForSampler, fields, saved
        )

    async def load_weights(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await _body(request, LoadWeightsBody)
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
            self.sessions.record_run(result.model_id, owner)
            return LoadWeightsResponse(path=body.path)

        self._start(
            owner,
            f"{model_id}/0",
            lambda: _convert(
                wire.CreateModelFromState,
                session_id=body.session_id,
                model_seq_id=body.model_seq_id,
                path=body.path,
                with_optimizer=body.optimizer,
            ),
            loaded,
        )
        return _json({"request_id": f"{model_id}/0", "model_id": model_id})

    # --- sampling ---

    async def create_sampling_session(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await _body(request, CreateSamplingSessionBody)
        sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        native = _convert(
            wire.CreateSamplingSession,
            sampling_session_id=sampler_id,
            model_path=body.model_path,
            base_model=body.base_model,
        )
        await self._call(native, owner)
        self.sessions.record_sampler(sampler_id, owner)
        return _json({"type": "create_sampling_session", "sampling_session_id": sampler_id})

    async def get_sampler(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        native = _convert(wire.GetSampler, sampling_session_id=request.match_info["sampler_id"])
        sampler: wire.SamplingSessionCreated = await self._call(native, owner)
        # Samplers made by save_weights_and_get_sampling_client have no checkpoint path.
        path = sampler.model_path if (sampler.model_path or "").startswith("tinker://") else None
        return _json(
            {"sampler_id": sampler.sampling_session_id, "base_model": sampler.base_model, "model_path": path}
        )

    async def asample(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await _body(request, SampleBody)
        unsupported = {
            "topk_sample_logprobs": body.topk_sample_logprobs != 0,
            "target_prompt_logprobs": body.target_prompt_logprobs is not None,
            "prompt_alt_tokens_k": body.prompt_alt_tokens_k != 0,
            "record_stability_info": bool(body.record_stability_info),
        }
        for name, asked in unsupported.items():
            if asked:
                raise ServiceError(400, f"{name}: not supported by this server (leave it at its default)")
        # The backend checks this too, but the sequence ids below are listed before it runs.
        if not 1 <= body.num_samples <= _MAX_NUM_SAMPLES:
            raise ServiceError(400, f"num_samples: expected 1 to {_MAX_NUM_SAMPLES}, got {body.num_samples}")
        request_id = f"{body.sampling_session_id}/{body.seq_id}"

        def build() -> wire.Sample:
            native = _convert(
                wire.Sample,
                sampling_session_id=body.sampling_session_id,
                seq_id=body.seq_id,
                prompt=body.prompt,
                num_samples=body.num_samples,
                sampling_params=body.sampling_params,
                include_prompt_logprobs=bool(body.prompt_logprobs) or body.topk_prompt_logprobs > 0,
                topk_prompt_logprobs=body.topk_prompt_logprobs,
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
            owner, request_id, build, lambda response: _only_last(response, body.prompt_logprobs_last_n)
        )
        sequence_ids = [f"{request_id}/{i}" for i in range(body.num_samples)]
        return _json({"request_id": request_id, "sample_sequence_ids": sequence_ids})

    # --- futures ---

    async def retrieve_future(self, request: web.Request) -> web.Response:
        owner = owner_of(request)
        body = await _body(request, RetrieveFutureBody)
        entry = await self.futures.wait(owner, body.request_id, self.config.long_poll_s)
        if entry is None:
            raise ServiceError(410, self._gone(body.request_id, owner))
        if not entry.task.done():
            return _json({"type": "try_again", "request_id": body.request_id, "queue_state": "active"})
        error = entry.task.exception()
        if error is not None:
            assert isinstance(error, ServiceError)  # _call raises nothing else
            return _json(_error(error))
        content_type = self._encode(entry, "application/x-protobuf" in request.headers.get("Accept", ""))
        payload = entry.encoded[content_type]
        if body.allow_metadata_only and len(payload) > self.config.inline_result_bytes:
            return _json({"status": "complete_metadata", "response_payload_size": len(payload)})
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
        if protobuf and isinstance(result, ForwardBackwardOutput):
            content_type, encode = "application/x-protobuf", proto.encode_forward_backward_output
        elif protobuf and isinstance(result, SampleResponse):
            content_type, encode = "application/x-protobuf", proto.encode_sample_response
        else:
            content_type, encode = "application/json", lambda value: msgspec.json.encode(_plain(value))
        if content_type not in entry.encoded:
            entry.encoded[content_type] = encode(result)
        return content_type

    # --- REST ---

    async def _rest(self, request: web.Request, native: Any) -> web.Response:
        return _json(await self._call(native, owner_of(request)))

    async def get_server_capabilities(self, request: web.Request) -> web.Response:
        return await self._rest(request, wire.GetServerCapabilities())

    async def list_training_runs(self, request: web.Request) -> web.Response:
        return await self._rest(
            request, _convert(wire.ListTrainingRuns, strict=False, **_query(request, "limit", "offset"))
        )

    async def get_training_run(self, request: web.Request) -> web.Response:
        return await self._rest(
            request, _convert(wire.GetTrainingRun, training_run_id=request.match_info["run_id"])
        )

    async def list_checkpoints(self, request: web.Request) -> web.Response:
        return await self._rest(
            request, _convert(wire.ListCheckpoints, training_run_id=request.match_info["run_id"])
        )

    async def list_user_checkpoints(self, request: web.Request) -> web.Response:
        query = _query(request, "limit", "offset")
        return await self._rest(request, _convert(wire.ListUserCheckpoints, strict=False, **query))

    async def delete_checkpoint(self, request: web.Request) -> web.Response:
        return await self._rest(request, _convert(wire.DeleteCheckpoint, tinker_path=_tinker_path(request)))

    async def set_checkpoint_ttl(self, request: web.Request) -> web.Response:
        ttl = (await _body(request, TtlBody)).ttl_seconds
        return await self._rest(
            request, _convert(wire.SetCheckpointTtl, tinker_path=_tinker_path(request), ttl_seconds=ttl)
        )

    async def weights_info(self, request: web.Request) -> web.Response:
        path = (await _body(request, WeightsInfoBody)).tinker_path
        return await self._rest(request, _convert(wire.GetWeightsInfo, tinker_path=path))

    async def unsupported(self, request: web.Request) -> web.Response:
        raise ServiceError(
            404, f"{request.method} {request.path}: not supported by this server (see docs/compat.md)"
        )


def _tinker_path(request: web.Request) -> str:
    info = request.match_info
    return f"tinker://{info['run_id']}/{info['kind']}/{info['name']}"


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
    training_run = "/api/v1/training_runs/{run_id}"
    checkpoint = training_run + "/checkpoints/{kind}/{name}"
    routes: list[tuple[str, str, Handler]] = [
        ("POST", "/api/v1/client/config", api.client_config),
        ("POST", "/api/v1/client/dynamic_config", api.client_dynamic_config),
        ("POST", "/api/v1/telemetry", api.telemetry),
        ("POST", "/api/v1/create_session", api.create_session),
        ("POST", "/api/v1/session_heartbeat", api.session_heartbeat),
        ("POST", "/api/v1/sessions/{session_id}/finish", api.finish_session),
        ("GET", "/api/v1/sessions", api.list_sessions),
        ("GET", "/api/v1/sessions/{session_id}", api.get_session),
        ("POST", "/api/v1/create_model", api.create_model),
        ("POST", "/api/v1/get_info", api.get_info),
        ("POST", "/api/v1/forward_backward", api.forward_backward),
        ("POST", "/api/v1/optim_step", api.optim_step),
        ("POST", "/api/v1/save_weights", api.save_weights),
        ("POST", "/api/v1/save_weights_for_sampler", api.save_weights_for_sampler),
        ("POST", "/api/v1/load_weights", api.load_weights),
        ("POST", "/api/v1/create_sampling_session", api.create_sampling_session),
        ("GET", "/api/v1/samplers/{sampler_id}", api.get_sampler),
        ("POST", "/api/v1/asample", api.asample),
        ("POST", "/api/v1/retrieve_future", api.retrieve_future),
        ("GET", "/api/v1/get_server_capabilities", api.get_server_capabilities),
        ("GET", "/api/v1/training_runs", api.list_training_runs),
        ("GET", training_run, api.get_training_run),
        ("GET", training_run + "/checkpoints", api.list_checkpoints),
        ("DELETE", checkpoint, api.delete_checkpoint),
        ("PUT", checkpoint + "/ttl", api.set_checkpoint_ttl),
        ("GET", "/api/v1/checkpoints", api.list_user_checkpoints),
        ("POST", "/api/v1/weights_info", api.weights_info),
        # Known routes this server does not serve, answered with a clear message.
        ("POST", "/api/v1/save_weights_external", api.unsupported),
        ("GET", training_run + "/checkpoints/external_weights/{name}/external_weights_urls", api.unsupported),
        ("POST", checkpoint + "/publish", api.unsupported),
        ("DELETE", checkpoint + "/publish", api.unsupported),
        ("POST", "/api/v1/copy_weights", api.unsupported),
        ("PUT", "/api/v1/sessions/{session_id}/project", api.unsupported),
        ("GET", "/api/v1/sessions/{session_id}/trace_export", api.unsupported),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, _errors_as_json(handler))

    async def release_long_polls(app: web.Application) -> None:
        api.futures.close()

    app.on_shutdown.append(release_long_polls)
