"""The official SDK's JSON request bodies, and the helpers that decode them and encode answers.

Bodies ignore unknown fields (such as the SDK's ``type``). ``convert`` builds a native request
(``tinker.wire``) from fields, validated by msgspec exactly as on the native wire; every error
becomes ``{"error", "category"}`` with an HTTP status, naming the field at fault.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from tinker.types import SampleResponse
from tinker.validation import InvalidInput
from tinker_backend.errors import ServiceError, as_service_error
from tinker_backend.tenancy import RateLimited

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    age_encryption_recipients: list[str] | None = None  # save_weights_external: must stay empty


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
    record_stability_info: bool | None = None
    # Not supported here; a request that asks for them is refused.
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: Any = None
    prompt_alt_tokens_k: int = 0


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


async def read_body(request: web.Request, body_type: type[T]) -> T:
    try:
        return msgspec.json.decode(await request.read(), type=body_type)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ServiceError(400, f"body: {e}") from e


def convert(request_type: type[T], *, strict: bool = True, **fields: Any) -> T:
    """``fields`` as a ``request_type`` (a native request, usually), validated by msgspec as on
    the native wire; a bad field is a 400 naming it. ``strict=False`` parses query strings."""
    try:
        return msgspec.convert(fields, request_type, strict=strict)
    except msgspec.ValidationError as e:
        raise ServiceError(400, str(e)) from e


def query_fields(request: web.Request, *names: str) -> dict[str, str]:
    return {name: request.query[name] for name in names if name in request.query}


def plain(value: Any) -> Any:
    """``value`` as JSON-ready builtins with every field, defaults included: the SDK's models
    require fields (``is_lora``, say) that our Structs leave out when they hold their default."""
    if isinstance(value, msgspec.Struct):
        return {name: plain(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(plain(value)), status=status, content_type="application/json"
    )


def error_body(error: ServiceError) -> dict[str, str]:
    return {"error": error.message, "category": error.category}


def errors_as_json(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except RateLimited as e:  # the SDK waits this long, then sends the request again
            response = json_response(error_body(e), status=e.status)
            response.headers["Retry-After-Ms"] = str(int(e.retry_after * 1000))
            return response
        except (ServiceError, InvalidInput) as e:
            error = as_service_error(e)
            return json_response(error_body(error), status=error.status)

    return wrapped


def only_last(response: SampleResponse, n: int | None) -> SampleResponse:
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


def on_loopback(request: web.Request) -> bool:
    return request.remote in ("127.0.0.1", "::1")
