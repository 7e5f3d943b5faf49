"""Chat renderers: conversations to tokens (prompts and weighted training examples) and back.

>>> renderer = get_renderer("chatml", tokenizer)                       # doctest: +SKIP
>>> prompt = renderer.build_generation_prompt([{"role": "user", "content": "hi"}])  # doctest: +SKIP

Names: ``role_colon`` (base models), ``chatml`` (ChatML without a default system prompt; the
tiny test model), ``smollm2`` (ChatML with SmolLM2's default system prompt), ``llama3``,
``qwen3`` (thinking on) and ``qwen3_disable_thinking``. :func:`register_renderer` adds more.
"""

from __future__ import annotations

from collections.abc import Callable

from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.renderers.base import (
    Message,
    RenderContext,
    RenderedMessage,
    Renderer,
    Tokenizer,
    TrainOnWhat,
)
from tinker_cookbook.renderers.formats import (
    SMOLLM2_SYSTEM_PROMPT,
    ChatMLRenderer,
    Llama3Renderer,
    Qwen3Renderer,
    RoleColonRenderer,
)

__all__ = [
    "ChatMLRenderer",
    "Llama3Renderer",
    "Message",
    "Qwen3Renderer",
    "RenderContext",
    "RenderedMessage",
    "Renderer",
    "RoleColonRenderer",
    "TrainOnWhat",
    "get_recommended_renderer_name",
    "get_renderer",
    "register_renderer",
]

_REGISTRY: dict[str, Callable[[Tokenizer], Renderer]] = {
    "role_colon": RoleColonRenderer,
    "chatml": ChatMLRenderer,
    "smollm2": lambda tok: ChatMLRenderer(tok, default_system_prompt=SMOLLM2_SYSTEM_PROMPT),
    "llama3": Llama3Renderer,
    "qwen3": Qwen3Renderer,
    "qwen3_disable_thinking": lambda tok: Qwen3Renderer(tok, enable_thinking=False),
}

# Model-name substrings (lower case) and the renderer their chat template matches.
_RECOMMENDED = (
    ("smollm2", "smollm2"),
    ("tiny", "chatml"),
    ("qwen3", "qwen3"),
    ("qwen2", "chatml"),
    ("llama-3", "llama3"),
)


def get_renderer(name: str, tokenizer: Tokenizer) -> Renderer:
    """The renderer registered as ``name``, for ``tokenizer``."""
    if name not in _REGISTRY:
        raise ConfigurationError(f"renderer_name: unknown renderer {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](tokenizer)


def register_renderer(name: str, factory: Callable[[Tokenizer], Renderer]) -> None:
    """Make ``get_renderer(name, tokenizer)`` return ``factory(tokenizer)``."""
    _REGISTRY[name] = factory


def get_recommended_renderer_name(model_name: str) -> str:
    """The renderer that matches ``model_name``'s chat template (``role_colon`` for base models)."""
    lowered = model_name.lower()
    if lowered.endswith("-base"):
        return "role_colon"
    for needle, renderer in _RECOMMENDED:
        if needle in lowered:
            return renderer
    raise ConfigurationError(
        f"renderer_name: no recommended renderer for model {model_name!r}; pass renderer_name= one of "
        f"{', '.join(sorted(_REGISTRY))}"
    )
