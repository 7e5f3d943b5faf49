"""The OpenAI-compatible door: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

``model`` is a base model name or a ``tinker://<run>/sampler_weights/<name>`` checkpoint of
the caller's key (``Authorization: Bearer <key>``); anyone else's checkpoint answers 404, as on
the native door. Everything goes through the server's one ``RequestHandler`` with native
requests, so these requests share the scheduler, its batching, the ownership checks, the
per-key limits and ``tinker.validation`` with every other client:

* one internal session per key owner (``CreateSession``), made on its first request;
* one sampler per ``(owner, model)`` (``CreateSamplingSession``), reused by later requests;
  its ``Sample`` requests take increasing ``seq_id``s;
* the base model's tokenizer is loaded here (once per base model, in a thread) to render chat
  templates, encode prompts and decode the sampled tokens.

Streaming (``stream: true``) answers server-sent events in the chunk format of OpenAI, but the
sampler returns whole sequences, so each choice's text arrives in one chunk once sampled.
``logprobs`` are those of the raw model distribution (temperature 1, before top-k / top-p),
as everywhere in tinker; alternatives (``top_logprobs``, completions ``logprobs: k``) come from
scoring the prompt plus the sampled tokens once more with ``topk_prompt_logprobs``.
See ``docs/openai.md``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tinker import wire
from tinker.types import ModelInput, SampleResponse, SamplingParams
from tinker.validation import InvalidInput, parse_tinker_path
from tinker_backend import auth, model_registry
from tinker_backend import openai_bodies as bodies
from tinker_backend.errors import ServiceError
from tinker_backend.openai_bodies import ChatRequest, CompletionRequest, OpenAIError
from tinker_backend.request_handler import RequestHandler
from tinker_backend.tenancy import RateLimited

__all__ = ["OpenAIDoor", "add_routes"]

# Tokens that end an assistant turn in the chat templates of common models; a chat reply stops
# at whichever of them the tokenizer knows (and at EOS).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class OpenAIDoor:
    """The state of the OpenAI door: sessions and samplers per owner, tokenizers per base model."""

    def __init__(self, handler: RequestHandler) -> None:
        self.handler = handler
        self._sessions: dict[str, asyncio.Task[str]] = {}  # owner -> its session id
        self._samplers: dict[tuple[str, str], asyncio.Task[tuple[str, str]]] = {}  # -> (sampler id, base)
        self._sampler_numbers: dict[str, itertools.count[int]] = {}  # owner -> sampler counter
        self._seq_ids: dict[str, itertools.count[int]] = {}  # sampler id -> Sample seq_id counter
        self._tokenizers: dict[str, asyncio.Task[Any]] = {}

    async def _once(self, tasks: dict[Any, asyncio.Task[Any]], key: Any, make: Callable[[], Awaitable[Any]]) -> Any:
        """``make()``, run once per key by concurrent callers; forgotten if it fails (so retried)."""
        if key not in tasks:
            tasks[key] = asyncio.ensure_future(make())
        try:
            return await asyncio.shield(tasks[key])
        except Exception:
            if tasks.get(key) is not None and tasks[key].done():
                tasks.pop(key, None)
            raise

    async def session(self, owner: str) -> str:
        """The owner's session for this door."""

        async def create() -> str:
            created = await self.handler.handle(wire.CreateSession({"door": "openai"}), owner)
            return str(created.session_id)

        return str(await self._once(self._sessions, owner, create))

    async def sampler(self, owner: str, model: str) -> tuple[str, str]:
        """``(sampler id, base model)`` of ``model`` for ``owner``; 404 (param ``model``) if unknown."""
        if model.startswith("tinker://"):
            parse_tinker_path(model, "sampler_weights", field="model")

        async def create() -> tuple[str, str]:
            session = await self.session(owner)
            number = next(self._sampler_numbers.setdefault(owner, itertools.count()))
            sampler_id = f"{session}:sample:{number}"
            if model.startswith("tinker://"):
                request = wire.CreateSamplingSession(sampler_id, model_path=model)
            else:
                request = wire.CreateSamplingSession(sampler_id, base_model=model)
            try:
                created = await self.handler.handle(request, owner)
            except ServiceError as e:
                if e.status == 404:
                    raise OpenAIError(404, f"model: unknown model {model!r} ({e.message})", "model", "model_not_found") from e
                raise
            return sampler_id, created.base_model

        return tuple(await self._once(self._samplers, (owner, model), create))

    async def tokenizer(self, base_model: str) -> Any:
        """The base model's tokenizer (loaded once, in a thread)."""

        def load() -> Any:
            from transformers import AutoTokenizer

            self.handler.engines.check_model_name(base_model)
            return AutoTokenizer.from_pretrained(model_registry.resolve_model(base_model))

        return await self._once(self._tokenizers, base_model, lambda: asyncio.to_thread(load))

    async def sample(
        self, owner: str, sampler_id: str, prompt: list[int], n: int, params: SamplingParams, top: int = 0
    ) -> SampleResponse:
        """One native ``Sample`` on the sampler; ``top > 0`` also asks for that many alternatives
        per prompt position (for scoring)."""
        seq_id = next(self._seq_ids.setdefault(sampler_id, itertools.count(1)))
        request = wire.Sample(
            sampler_id, seq_id, ModelInput.from_ints(prompt), n, params,
            include_prompt_logprobs=top > 0, topk_prompt_logprobs=top,
        )  # fmt: skip
        response: SampleResponse = await self.handler.handle(request, owner)
        return response

    async def alternatives(
        self, owner: str, sampler_id: str, prompt: list[int], tokens: list[int], top: int
    ) -> list[list[tuple[int, float]]]:
        """The ``top`` most likely tokens at each of ``tokens``' positions after ``prompt``,
        scored by the same sampler (the prompt-logprob machinery, run on prompt + tokens)."""
        if not tokens:
            return []
        scored = await self.sample(owner, sampler_id, prompt + tokens, 1, SamplingParams(max_tokens=1), top)
        rows = scored.topk_prompt_logprobs or []
        return [list(row or []) for row in rows[len(prompt) : len(prompt) + len(tokens)]]


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The ids of the end-of-turn tokens (``END_OF_TURN``) that ``tokenizer`` knows."""
    vocab = tokenizer.get_vocab()
    return sorted({vocab[t] for t in END_OF_TURN if t in vocab})


async def _choices(
    door: OpenAIDoor, owner: str, sampler_id: str, tokenizer: Any, prompt: list[int], opts: bodies.Options
) -> tuple[list[bodies.Choice], int]:
    """Sample ``opts.n`` choices for one prompt; the choices and the number of tokens generated."""
    response = await door.sample(owner, sampler_id, prompt, opts.n, opts.params)
    stops = opts.params.stop_strings()
    choices = []
    for seq in response.sequences:
        top = None
        if opts.top_logprobs:
            top = await door.alternatives(owner, sampler_id, prompt, list(seq.tokens), opts.top_logprobs)
        choices.append(bodies.choice_of(tokenizer, seq, stops, top))
    return choices, sum(len(seq.tokens) for seq in response.sequences)


def _encode_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    return list(prompt) if isinstance(prompt, list) else list(tokenizer(prompt)["input_ids"])


def _chat_prompt(tokenizer: Any, request: ChatRequest) -> list[int]:
    """The messages rendered with the model's chat template, ready for the assistant's turn."""
    messages = bodies.message_dicts(request.messages)
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInput("model", "a model with a chat template (use /v1/completions for this one)", request.model)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- routes ------------------------------------------------------------------------------------

DOOR_KEY = web.AppKey("openai_door", OpenAIDoor)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _errors_as_openai(handler: Handler) -> Handler:
    """Answer every failure of ``handler`` with an OpenAI-shaped error body and its status."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as e:
            error = _as_openai_error(e)
            response = web.json_response(error.body(), status=error.status)
            if error.retry_after is not None:
                response.headers["Retry-After"] = str(max(1, round(error.retry_after)))
            return response

    return wrapped


def _as_openai_error(error: Exception) -> OpenAIError:
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, InvalidInput):
        return OpenAIError(400, str(error), error.field.split("[", 1)[0].split(".", 1)[0])
    if isinstance(error, ServiceError):
        converted = OpenAIError(error.status, error.message, bodies.param_of(error.message))
        if isinstance(error, RateLimited):
            converted.code, converted.retry_after = "rate_limit_exceeded", error.retry_after
        return converted
    if isinstance(error, web.HTTPException):
        raise error
    return OpenAIError(500, f"{type(error).__name__}: {error}")


async def _respond(request: web.Request, body: dict[str, Any], opts: bodies.Options) -> web.StreamResponse:
    """The response as JSON, or as server-sent events when ``stream`` was asked."""
    if not opts.stream:
        return web.json_response(body)
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await stream.prepare(request)
    for chunk in bodies.stream_chunks(body, opts.include_usage):
        await stream.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await stream.write(b"data: [DONE]\n\n")
    await stream.write_eof()
    return stream


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``: one or more prompts, ``n`` choices each (prompt-major order)."""
    door, owner = request.app[DOOR_KEY], auth.authenticate(request)
    body: CompletionRequest = bodies.decode_body(await request.read(), CompletionRequest)
    opts = bodies.options(body, [])
    prompts = bodies.prompts_of(body.prompt)
    sampler_id, base_model = await door.sampler(owner, body.model)
    tokenizer = await door.tokenizer(base_model)
    encoded = [_encode_prompt(tokenizer, p) for p in prompts]
    results = await asyncio.gather(*(_choices(door, owner, sampler_id, tokenizer, p, opts) for p in encoded))
    choices = [c for cs, _ in results for c in cs]
    use = bodies.usage(sum(map(len, encoded)), sum(n for _, n in results))
    response = bodies.completion_body(bodies.new_id("cmpl"), body.model, choices, opts.logprobs, use)
    return await _respond(request, response, opts)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: the messages rendered with the model's chat template."""
    door, owner = request.app[DOOR_KEY], auth.authenticate(request)
    body: ChatRequest = bodies.decode_body(await request.read(), ChatRequest)
    bodies.options(body, [])  # the request's own checks come before the model's
    sampler_id, base_model = await door.sampler(owner, body.model)
    tokenizer = await door.tokenizer(base_model)
    opts = bodies.options(body, end_of_turn_ids(tokenizer))
    prompt = _chat_prompt(tokenizer, body)
    choices, generated = await _choices(door, owner, sampler_id, tokenizer, prompt, opts)
    use = bodies.usage(len(prompt), generated)
    response = bodies.chat_body(bodies.new_id("chatcmpl"), body.model, choices, opts.logprobs, use)
    return await _respond(request, response, opts)


async def list_models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: the server's base models, then the caller's sampler checkpoints."""
    return web.json_response({"object": "list", "data": await _models(request)})


async def get_model(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models/{model}``: one entry of the list, or 404."""
    wanted = request.match_info["model"]
    for entry in await _models(request):
        if entry["id"] == wanted:
            return web.json_response(entry)
    raise OpenAIError(404, f"model: unknown model {wanted!r}", "model", "model_not_found")


async def _models(request: web.Request) -> list[dict[str, Any]]:
    handler, owner = request.app[DOOR_KEY].handler, auth.authenticate(request)
    capabilities = await handler.handle(wire.GetServerCapabilities(), owner)
    started = int(time.time())
    data = [
        {"id": m.model_name, "object": "model", "created": started, "owned_by": "tinker"}
        for m in capabilities.supported_models
    ]
    listed = await handler.handle(wire.ListUserCheckpoints(limit=1000), owner)
    for checkpoint in listed.checkpoints:
        if checkpoint.checkpoint_type == "sampler":
            created = _epoch(checkpoint.time)
            data.append({"id": checkpoint.tinker_path, "object": "model", "created": created, "owned_by": owner})
    return data


def _epoch(iso: str) -> int:
    import datetime as dt

    try:
        return int(dt.datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def add_routes(app: web.Application, backend_key: web.AppKey[RequestHandler]) -> None:
    """Serve the OpenAI door on ``app``, over the ``RequestHandler`` at ``backend_key`` (made at
    start-up, so the door is made by a start-up hook registered after it)."""

    async def start(app: web.Application) -> None:
        app[DOOR_KEY] = OpenAIDoor(app[backend_key])

    app.on_startup.append(start)
    app.router.add_get("/v1/models", _errors_as_openai(list_models))
    app.router.add_get("/v1/models/{model:.+}", _errors_as_openai(get_model))
    app.router.add_post("/v1/completions", _errors_as_openai(completions))
    app.router.add_post("/v1/chat/completions", _errors_as_openai(chat_completions))
