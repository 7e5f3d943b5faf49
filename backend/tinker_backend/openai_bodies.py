"""The bodies of the OpenAI-compatible routes (``openai_api``): requests in, responses out. No I/O.

Requests are decoded into the Structs below (unknown fields are ignored, as OpenAI's own
server does); fields whose non-default value this server cannot honour are refused with a 400
naming them (:func:`refuse_unsupported`) rather than silently ignored. Responses are plain
dicts in the shapes the official ``openai`` package parses: ``text_completion``,
``chat.completion`` and their streamed ``*.chunk`` forms.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from tinker.types import SampledSequence, SamplingParams
from tinker.validation import MAX_NUM_SAMPLES, InvalidInput

# OpenAI's limits on logprobs: 5 alternatives per token for completions, 20 for chat.
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after: float | None = None

    def body(self) -> dict[str, Any]:
        """The JSON body of this error."""
        kinds = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}
        kind = "server_error" if self.status >= 500 else kinds.get(self.status, "invalid_request_error")
        if self.status == 429:
            kind = "rate_limit_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def param_of(message: str) -> str | None:
    """The field a ``"<field>: expected ..."`` message names (``stop[1]`` -> ``stop``), else None."""
    head, sep, _ = message.partition(":")
    name = head.split("[", 1)[0].strip()
    return name if sep and name.replace("_", "").replace(".", "").isalnum() else None


# --- requests ----------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    """The fields both endpoints share. ``top_k`` is an extension (as in vLLM's server)."""

    model: str
    n: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Common, kw_only=True):
    """``POST /v1/completions``; ``prompt`` is a string, token ids, or a list of either."""

    prompt: Any
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class Message(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Common, kw_only=True):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is the newer ``max_tokens``."""

    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def decode_body(data: bytes, kind: type[msgspec.Struct]) -> Any:
    """The request body as ``kind``; a 400 naming the field for a wrong or missing one."""
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as e:  # "Expected `int`, got `str` - at `$.n`"
        text = str(e)
        where = text.rpartition("at `$.")[2].rstrip("`") if "at `$." in text else None
        param = None if where is None else where.split("[", 1)[0].split(".", 1)[0]
        if param is None and "missing required field" in text:
            param = text.rpartition("`")[0].rpartition("`")[2] or None
        raise OpenAIError(400, f"{param or 'body'}: {text}", param) from e
    except msgspec.DecodeError as e:
        raise OpenAIError(400, f"body: expected a JSON object, got invalid JSON ({e})") from e


def _refuse(field: str, expected: str, got: Any) -> OpenAIError:
    return OpenAIError(400, str(InvalidInput(field, expected, got)), field, "unsupported_parameter")


def refuse_unsupported(request: CompletionRequest | ChatRequest) -> None:
    """A 400 naming the first field set to something this server cannot honour."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) not in (None, 0, 0.0):
            raise _refuse(name, "0 (penalties are not supported)", getattr(request, name))
    if request.logit_bias:
        raise _refuse("logit_bias", "none (not supported)", request.logit_bias)
    if isinstance(request, CompletionRequest):
        if request.echo:
            raise _refuse("echo", "false (not supported)", request.echo)
        if request.suffix:
            raise _refuse("suffix", "none (not supported)", request.suffix)
        if request.best_of not in (None, 1) and request.best_of != request.n:
            raise _refuse("best_of", "none, 1 or n (not supported otherwise)", request.best_of)
        return
    for name in ("tools", "functions"):
        if getattr(request, name):
            raise _refuse(name, "none (tool calls are not supported)", "a list")
    if request.response_format is not None and request.response_format.get("type", "text") != "text":
        raise _refuse("response_format", "{'type': 'text'} (not supported otherwise)", request.response_format)


@dataclass(frozen=True)
class Options:
    """What one request asks of the sampler, checked: ``n`` choices, ``params``, ``top_logprobs``
    alternatives per token (0: none) and whether any logprobs are wanted at all."""

    n: int
    params: SamplingParams
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool


def options(request: CompletionRequest | ChatRequest, stop_token_ids: list[int]) -> Options:
    """The sampling options of ``request`` (400 naming the field if one is out of range).

    ``stop_token_ids``: the chat template's end-of-turn tokens, which stop a chat reply.
    """
    refuse_unsupported(request)
    n = 1 if request.n is None else request.n
    if type(n) is not int or not 1 <= n <= MAX_NUM_SAMPLES:
        raise InvalidInput("n", f"1 to {MAX_NUM_SAMPLES}", n)
    if isinstance(request, ChatRequest):
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        wants, top = bool(request.logprobs), request.top_logprobs or 0
        if top and not wants:
            raise InvalidInput("top_logprobs", "none unless logprobs is true", top)
        if not 0 <= top <= MAX_CHAT_TOP_LOGPROBS:
            raise InvalidInput("top_logprobs", f"0 to {MAX_CHAT_TOP_LOGPROBS}", top)
    else:
        max_tokens = 16 if request.max_tokens is None else request.max_tokens  # OpenAI's default
        wants, top = request.logprobs is not None, request.logprobs or 0
        if not 0 <= top <= MAX_COMPLETION_LOGPROBS:
            raise InvalidInput("logprobs", f"none or 0 to {MAX_COMPLETION_LOGPROBS}", top)
    strings = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    stop: list[str | int] | None = [*strings, *stop_token_ids] if strings or stop_token_ids else None
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            seed=request.seed,
            stop=stop,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_k=-1 if request.top_k is None else request.top_k,
            top_p=1.0 if request.top_p is None else request.top_p,
        )
    except ValueError as e:  # "<field>: expected ..., got ..."
        raise OpenAIError(400, str(e), param_of(str(e))) from e
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    return Options(n, params, wants, top, bool(request.stream), include_usage)


def prompts_of(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completion request: one string, token ids, or a list of either."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_ids(prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        return list(prompt)
    raise InvalidInput("prompt", "a string, a list of token ids, or a non-empty list of either", prompt)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def message_dicts(messages: list[Message]) -> list[dict[str, str]]:
    """The messages as the chat template wants them; content parts other than text are refused."""
    if not messages:
        raise InvalidInput("messages", "at least one message", "[]")
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise InvalidInput(f"messages[{i}].content[{j}]", "a text part (only text is supported)", part.type)
            content = "".join(part.text or "" for part in content)
        out.append({"role": message.role, "content": content or ""})
    return out


# --- responses ---------------------------------------------------------------------------------


@dataclass
class Choice:
    """One finished choice: its text, why it ended, and (if asked) per-token logprobs."""

    text: str
    finish_reason: str
    tokens: list[str]
    logprobs: list[float]
    top_logprobs: list[list[tuple[str, float]]] | None


def choice_of(tokenizer: Any, seq: SampledSequence, stop_strings: list[str], top: list[list[tuple[int, float]]] | None) -> Choice:
    """The OpenAI view of a sampled sequence: the ending stop token dropped, the text cut before
    the first stop string (the sampler keeps what it stopped at), the kept tokens' logprobs."""
    tokens = list(seq.tokens)
    if seq.stop_reason == "stop" and tokens and tokens[-1] in tokenizer.all_special_ids:
        tokens.pop()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    finish = "length" if seq.stop_reason == "length" else "stop"
    cuts = [text.find(s) for s in stop_strings if s in text]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    pieces: list[str] = []
    offset = 0
    for token in tokens:  # the tokens that make up the kept text
        if offset >= len(text) and pieces:
            break
        piece = tokenizer.decode([token], skip_special_tokens=True)
        pieces.append(piece)
        offset += len(piece)
    kept = len(pieces)
    alternatives = None
    if top is not None:
        alternatives = [[(tokenizer.decode([t]), lp) for t, lp in row] for row in top[:kept]]
    return Choice(text, finish, pieces, list(seq.logprobs or [])[:kept], alternatives)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(choice: Choice) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object."""
    offsets, at = [], 0
    for piece in choice.tokens:
        offsets.append(at)
        at += len(piece)
    top = None if choice.top_logprobs is None else [dict(row) for row in choice.top_logprobs]
    return {"tokens": choice.tokens, "token_logprobs": choice.logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(choice: Choice) -> dict[str, Any]:
    """The chat ``logprobs`` object: one entry per token, with its alternatives."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = []
    for i, (token, logprob) in enumerate(zip(choice.tokens, choice.logprobs, strict=False)):
        alternatives = [] if choice.top_logprobs is None else [entry(t, lp) for t, lp in choice.top_logprobs[i]]
        content.append({**entry(token, logprob), "top_logprobs": alternatives})
    return {"content": content, "refusal": None}


def completion_body(rid: str, model: str, choices: list[Choice], wants: bool, use: dict[str, int]) -> dict[str, Any]:
    """A ``text_completion`` response."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                "text": c.text,
                "logprobs": completion_logprobs(c) if wants else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": use,
    }


def chat_body(rid: str, model: str, choices: list[Choice], wants: bool, use: dict[str, int]) -> dict[str, Any]:
    """A ``chat.completion`` response."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": chat_logprobs(c) if wants else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": use,
    }


def stream_chunks(body: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A finished response as the chunks of its stream: per choice, a first chunk (the role, for
    chat), one chunk with all of its text, and one with its finish reason; then, if asked, a
    usage chunk with no choices. The sampler returns whole sequences, so the text of a choice
    arrives in one chunk once it is sampled."""
    chat = body["object"] == "chat.completion"
    head = {k: body[k] for k in ("id", "created", "model", "system_fingerprint")}
    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, part: dict[str, Any], finish: str | None, logprobs: Any = None) -> dict[str, Any]:
        fields = {"delta": part} if chat else {"text": part.get("content", "")}
        choice = {"index": index, **fields, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "choices": [choice], **extra}

    chunks = []
    for choice in body["choices"]:
        i = choice["index"]
        text = choice["message"]["content"] if chat else choice["text"]
        if chat:
            chunks.append(chunk(i, {"role": "assistant", "content": ""}, None))
        chunks.append(chunk(i, {"content": text}, None, choice["logprobs"]))
        chunks.append(chunk(i, {}, choice["finish_reason"]))
    if include_usage:
        chunks.append({**head, "choices": [], "usage": body["usage"]})
    return chunks
