"""An inspect-ai model provider for Tinker samplers: ``inspect eval TASK --model tinker/MODEL``.

``MODEL`` is a base model (``tinker/HuggingFaceTB/SmolLM2-135M-Instruct``) or a sampler
checkpoint (``tinker/tinker://RUN/sampler_weights/NAME``). The provider samples through
``tinker``: the embedded backend by default, a server with ``--model-base-url URL`` (in Python
``eval(..., model_base_url=URL)``) or
``$TINKER_BASE_URL``. Chat messages go through the model's recommended renderer (``-M
renderer=NAME`` to choose another); the reply ends at the renderer's stop sequences.

Registered with inspect through the ``inspect_ai`` entry point in ``pyproject.toml``
(``tinker_cookbook = "tinker_cookbook.eval.inspect_provider"``). In-process code (see
:mod:`tinker_cookbook.eval.inspect_evaluator`) can pass a ready ``sampling_client=`` model arg.
Tool calling is not supported: a task that offers tools gets an error.
"""

from __future__ import annotations

from typing import Any

from inspect_ai.model import (
    ChatMessage,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    ModelUsage,
    modelapi,
)
from inspect_ai.tool import ToolChoice, ToolInfo

import tinker
from tinker_cookbook.renderers import Message, Renderer, get_recommended_renderer_name, get_renderer

DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "user", "assistant", "tool")


def to_messages(input: list[ChatMessage]) -> list[Message]:
    """inspect's chat messages as renderer messages (text only)."""
    messages = []
    for i, message in enumerate(input):
        if message.role not in ROLES:
            raise ValueError(f"input[{i}].role: expected one of {ROLES}, got {message.role!r}")
        messages.append(Message(role=message.role, content=message.text))
    return messages


@modelapi(name="tinker")
class TinkerModelAPI(ModelAPI):
    """Samples from a Tinker base model or ``tinker://`` sampler checkpoint (see the module doc)."""

    def __init__(
        self,
        model_name: str,
        base_url: str | None = None,
        api_key: str | None = None,
        config: GenerateConfig = GenerateConfig(),
        renderer: str | None = None,
        sampling_client: tinker.SamplingClient | None = None,
        **model_args: Any,
    ) -> None:
        super().__init__(model_name, base_url, api_key, ["TINKER_API_KEY"], config)
        if model_args:
            raise ValueError(f"model_args: unexpected {sorted(model_args)} (known: base_url, renderer, sampling_client)")
        if sampling_client is None:
            service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
            if model_name.startswith("tinker://"):
                sampling_client = service.create_sampling_client(model_path=model_name)
            else:
                sampling_client = service.create_sampling_client(base_model=model_name)
        self.sampling_client = sampling_client
        self.renderer_name = renderer
        self._renderer: Renderer | None = None

    async def renderer(self) -> Renderer:
        """The renderer, once the sampler exists (inspect builds the model inside its event loop, so wait there)."""
        if self._renderer is None:
            await self.sampling_client
            name = self.renderer_name or get_recommended_renderer_name(self.sampling_client.get_base_model())
            self._renderer = get_renderer(name, self.sampling_client.get_tokenizer())
        return self._renderer

    async def generate(
        self, input: list[ChatMessage], tools: list[ToolInfo], tool_choice: ToolChoice, config: GenerateConfig
    ) -> ModelOutput:
        if tools:
            raise ValueError("tools: the tinker provider does not support tool calling")
        renderer = await self.renderer()
        prompt = renderer.build_generation_prompt(to_messages(input))
        max_tokens = config.max_tokens or DEFAULT_MAX_TOKENS
        params = tinker.SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if config.temperature is None else config.temperature,
            top_p=1.0 if config.top_p is None else config.top_p,
            top_k=-1 if config.top_k is None else config.top_k,
            seed=config.seed,
            stop=[*renderer.get_stop_sequences(), *(config.stop_seqs or [])],
        )
        response = await self.sampling_client.sample(prompt, 1, params)
        tokens = list(response.sequences[0].tokens)
        message, ended = renderer.parse_response(tokens)
        output = ModelOutput.from_content(self.model_name, message["content"],
                                          stop_reason="stop" if ended else "max_tokens")
        output.usage = ModelUsage(input_tokens=prompt.length, output_tokens=len(tokens),
                                  total_tokens=prompt.length + len(tokens))
        return output

    def max_tokens(self) -> int | None:
        return DEFAULT_MAX_TOKENS
