"""The chat formats: ``role_colon``, ChatML (SmolLM2, Qwen2.5), ``llama3`` and ``qwen3``."""

from __future__ import annotations

from tinker_cookbook.renderers.base import (
    Message,
    RenderContext,
    RenderedMessage,
    Renderer,
    Tokenizer,
    single_token_id,
    split_at_stop,
)

SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class RoleColonRenderer(Renderer):
    """Plain text for base models: ``User: hi\\n\\nAssistant: hello\\n\\n``; stops at ``\\n\\nUser:``."""

    STOP = "\n\nUser:"

    def bos_tokens(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos] if bos is not None else []

    def render_message(self, message: Message, ctx: RenderContext) -> RenderedMessage:
        header = self.encode(message["role"].capitalize() + ":")
        return RenderedMessage(header, self.encode(" " + message["content"] + "\n\n"))

    def get_stop_sequences(self) -> list[str]:
        return [self.STOP]

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        text = self.tokenizer.decode(tokens)
        content, found, _ = text.partition(self.STOP)
        return Message(role="assistant", content=content.strip()), bool(found)


class ChatMLRenderer(Renderer):
    """``<|im_start|>role\\ncontent<|im_end|>``, messages joined by ``\\n`` (SmolLM2, Qwen2.5,
    the tiny test model). The joining newline is the start of the next header, so a sampled
    reply that stops at ``<|im_end|>`` is a prefix of the next turn's prompt.

    ``default_system_prompt`` is inserted when a conversation has no system message, as
    SmolLM2's and Qwen2.5's templates do.
    """

    def __init__(self, tokenizer: Tokenizer, default_system_prompt: str | None = None) -> None:
        super().__init__(tokenizer)
        self.default_system_prompt = default_system_prompt
        self.end_id = single_token_id(tokenizer, "<|im_end|>")

    def preprocess(self, messages: list[Message]) -> list[Message]:
        if self.default_system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            return [Message(role="system", content=self.default_system_prompt), *messages]
        return messages

    def header_text(self, message: Message, ctx: RenderContext) -> str:
        return ("\n" if ctx.index > 0 else "") + f"<|im_start|>{message['role']}\n"

    def content_text(self, message: Message, ctx: RenderContext) -> str:
        return message["content"]

    def render_message(self, message: Message, ctx: RenderContext) -> RenderedMessage:
        header = self.encode(self.header_text(message, ctx))
        return RenderedMessage(header, [*self.encode(self.content_text(message, ctx)), self.end_id])

    def get_stop_sequences(self) -> list[int]:
        return [self.end_id]

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        body, ok = split_at_stop(tokens, {self.end_id})
        return Message(role="assistant", content=self.tokenizer.decode(body)), ok


class Qwen3Renderer(ChatMLRenderer):
    """Qwen3: ChatML plus ``<think>`` reasoning blocks, as Qwen3's own chat template renders them.

    * Assistant messages after the last user message carry their reasoning as
      ``<think>\\n{thinking}\\n</think>\\n\\n{content}``; the final one always does (with an
      empty block when it has no reasoning). Earlier ones are rendered without it.
    * ``enable_thinking=False`` (renderer ``qwen3_disable_thinking``) prefills the empty block
      ``<think>\\n\\n</think>\\n\\n`` in the generation prompt, so the model answers directly;
      in supervised examples that block is then part of the (untrained) header.
    * Reasoning comes from ``message["thinking"]``, or from a ``<think>...</think>`` prefix of
      the content. :meth:`parse_response` splits it back into ``thinking``.
    """

    EMPTY_THINK = "<think>\n\n</think>\n\n"

    def __init__(self, tokenizer: Tokenizer, enable_thinking: bool = True) -> None:
        super().__init__(tokenizer)
        self.enable_thinking = enable_thinking

    def _think_block(self, message: Message, ctx: RenderContext) -> str | None:
        """The ``<think>`` block this assistant message is rendered with, or None."""
        thinking, _ = _split_thinking(message)
        if ctx.index > ctx.last_user_index and (ctx.is_last or thinking):
            return f"<think>\n{thinking.strip(chr(10))}\n</think>\n\n"
        return None

    def header_text(self, message: Message, ctx: RenderContext) -> str:
        header = super().header_text(message, ctx)
        if message["role"] == "assistant" and not self.enable_thinking and self._think_block(message, ctx) == self.EMPTY_THINK:
            header += self.EMPTY_THINK
        return header

    def content_text(self, message: Message, ctx: RenderContext) -> str:
        if message["role"] != "assistant":
            return message["content"]
        _, content = _split_thinking(message)
        block = self._think_block(message, ctx)
        if block is None:
            return content
        if not self.enable_thinking and block == self.EMPTY_THINK:
            return content.lstrip("\n")  # the block is in the header
        return block + content.lstrip("\n")

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        message, ok = super().parse_response(tokens)
        thinking, content = _split_thinking(message)
        parsed = Message(role="assistant", content=content.strip())
        if thinking:
            parsed["thinking"] = thinking.strip()
        return parsed, ok


def _split_thinking(message: Message) -> tuple[str, str]:
    """(reasoning, visible content), as Qwen3's template splits them."""
    content = message["content"]
    if "thinking" in message:
        return message["thinking"], content
    if "</think>" in content:
        before, _, after = content.partition("</think>")
        return before.rstrip("\n").split("<think>")[-1].lstrip("\n"), after.lstrip("\n")
    return "", content


class Llama3Renderer(Renderer):
    """Llama 3 instruct: ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``
    after ``<|begin_of_text|>``; content is stripped, as the official template does."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.eot_id = single_token_id(tokenizer, "<|eot_id|>")

    def bos_tokens(self) -> list[int]:
        return [single_token_id(self.tokenizer, "<|begin_of_text|>")]

    def render_message(self, message: Message, ctx: RenderContext) -> RenderedMessage:
        header = self.encode(f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n")
        return RenderedMessage(header, [*self.encode(message["content"].strip()), self.eot_id])

    def get_stop_sequences(self) -> list[int]:
        return [self.eot_id]

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        body, ok = split_at_stop(tokens, {self.eot_id})
        return Message(role="assistant", content=self.tokenizer.decode(body).strip()), ok
