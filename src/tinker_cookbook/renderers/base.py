"""The ``Renderer`` interface: chat messages <-> tokens, for sampling and for training.

A renderer turns each message into a *header* (the role marker; never trained on) and an
*output* (the content and its end-of-message marker; what the model must learn to produce).
From that one method, :class:`Renderer` builds generation prompts, supervised examples with
per-token weights (:class:`TrainOnWhat`), and the prompt used for RL rollouts. Header and
output are tokenized separately, at boundaries where the model's own chat template has a
special token or a newline, so the tokens equal ``tokenizer.apply_chat_template`` output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NotRequired, TypeAlias, TypedDict

import tinker
from tinker_cookbook.exceptions import RendererError

Tokenizer: TypeAlias = Any  # a transformers tokenizer


class Message(TypedDict):
    """One chat message. ``thinking`` holds the reasoning of thinking models (Qwen3);
    ``trainable`` marks messages to train on with ``TrainOnWhat.CUSTOMIZED``."""

    role: str
    content: str
    thinking: NotRequired[str]
    trainable: NotRequired[bool]


class TrainOnWhat(StrEnum):
    """Which tokens of a conversation get weight 1 in a supervised example (the rest get 0)."""

    LAST_ASSISTANT_MESSAGE = "last_assistant_message"
    """Only the output of the final message, which must be an assistant message."""
    ALL_ASSISTANT_MESSAGES = "all_assistant_messages"
    """The output of every assistant message."""
    ALL_MESSAGES = "all_messages"
    """The output of every message (headers stay 0)."""
    ALL_TOKENS = "all_tokens"
    """Everything, headers and BOS included (plain language modelling)."""
    ALL_USER_AND_SYSTEM_MESSAGES = "all_user_and_system_messages"
    """The outputs of user and system messages."""
    CUSTOMIZED = "customized"
    """The outputs of messages with ``trainable=True``."""


@dataclass(frozen=True)
class RenderContext:
    """Where a message sits in its conversation (some templates render by position)."""

    index: int
    is_last: bool
    last_user_index: int
    """Index of the last user message (-1 if none); Qwen3 keeps reasoning only after it."""


@dataclass(frozen=True)
class RenderedMessage:
    header: list[int]
    output: list[int]


class Renderer(ABC):
    """Renders conversations for one chat format. Subclasses implement the four abstract methods."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    # --- what a format defines --------------------------------------------------------------

    @abstractmethod
    def render_message(self, message: Message, ctx: RenderContext) -> RenderedMessage:
        """The header and output tokens of ``message`` at position ``ctx``."""

    @abstractmethod
    def get_stop_sequences(self) -> list[int] | list[str]:
        """What ends an assistant message when sampling (token ids or strings)."""

    @abstractmethod
    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        """The assistant message in sampled ``tokens``, and whether it ended cleanly (a stop
        sequence was found, as opposed to running out of tokens)."""

    def bos_tokens(self) -> list[int]:
        """Tokens that start every conversation (e.g. ``<|begin_of_text|>``)."""
        return []

    # --- built on top ------------------------------------------------------------------------

    def preprocess(self, messages: list[Message]) -> list[Message]:
        """Hook to adjust a conversation before rendering (e.g. add a default system prompt)."""
        return messages

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _rendered(self, messages: list[Message], extra: Message | None = None) -> list[RenderedMessage]:
        messages = self.preprocess(list(messages))
        if extra is not None:
            messages.append(extra)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        return [
            self.render_message(m, RenderContext(i, i == len(messages) - 1, last_user))
            for i, m in enumerate(messages)
        ]

    def build_generation_prompt(
        self, messages: list[Message], role: str = "assistant", prefill: str | None = None
    ) -> tinker.ModelInput:
        """The prompt for sampling the next ``role`` message: the conversation, then the new
        message's header, then ``prefill`` (text the response is forced to start with)."""
        rendered = self._rendered(messages, Message(role=role, content=""))
        tokens = list(self.bos_tokens())
        for r in rendered[:-1]:
            tokens += r.header + r.output
        tokens += rendered[-1].header
        if prefill:
            tokens += self.encode(prefill)
        return tinker.ModelInput.from_ints(tokens)

    def build_supervised_example(
        self, messages: list[Message], train_on_what: TrainOnWhat = TrainOnWhat.LAST_ASSISTANT_MESSAGE
    ) -> tuple[tinker.ModelInput, list[float]]:
        """All tokens of the conversation and a weight per token (1 = train on it)."""
        train_on_what = TrainOnWhat(train_on_what)
        if train_on_what == TrainOnWhat.LAST_ASSISTANT_MESSAGE and (not messages or messages[-1]["role"] != "assistant"):
            raise RendererError("messages: train_on_what=last_assistant_message needs an assistant message last")
        rendered = self._rendered(messages)
        # preprocess may add messages at the front (a default system prompt); align from the end.
        offset = len(rendered) - len(messages)
        all_tokens = train_on_what == TrainOnWhat.ALL_TOKENS
        bos = self.bos_tokens()
        tokens, weights = list(bos), [float(all_tokens)] * len(bos)
        for i, r in enumerate(rendered):
            message = messages[i - offset] if i >= offset else None
            train = all_tokens or (message is not None and _trains(message, i - offset == len(messages) - 1, train_on_what))
            tokens += r.header + r.output
            weights += [float(all_tokens)] * len(r.header) + [float(train)] * len(r.output)
        return tinker.ModelInput.from_ints(tokens), weights


def _trains(message: Message, is_last: bool, what: TrainOnWhat) -> bool:
    role = message["role"]
    if what == TrainOnWhat.LAST_ASSISTANT_MESSAGE:
        return is_last
    if what == TrainOnWhat.ALL_ASSISTANT_MESSAGES:
        return role == "assistant"
    if what == TrainOnWhat.ALL_MESSAGES:
        return True
    if what == TrainOnWhat.ALL_USER_AND_SYSTEM_MESSAGES:
        return role in ("user", "system")
    if what == TrainOnWhat.CUSTOMIZED:
        return bool(message.get("trainable", False))
    raise AssertionError(what)


def split_at_stop(tokens: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop token, and whether one was found."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i], True
    return tokens, False


def single_token_id(tokenizer: Tokenizer, text: str) -> int:
    """The id of a special token such as ``<|im_end|>``; raises if the tokenizer lacks it."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise RendererError(f"tokenizer: expected {text!r} to be one special token, got ids {ids}")
    return ids[0]
