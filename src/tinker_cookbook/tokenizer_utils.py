"""Tokenizers by model name, offline.

In a training loop prefer ``training_client.get_tokenizer()``: it asks the backend, so it
also works against a remote server. :func:`get_tokenizer` is for code that has no client
yet (datasets, tests, notebooks): it looks, in order, in the registry of
:func:`register_tokenizer`, in a local folder of that name, in the models this machine's
embedded backend can build offline (``tiny-llama``, SmolLM2), and in the local Hugging
Face cache. It never downloads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinker_cookbook.exceptions import ConfigurationError

Tokenizer = Any

_FACTORIES: dict[str, Callable[[], Tokenizer]] = {}


def register_tokenizer(model_name: str, factory: Callable[[], Tokenizer]) -> None:
    """Make :func:`get_tokenizer` build ``model_name``'s tokenizer with ``factory``."""
    _FACTORIES[model_name] = factory
    get_tokenizer.cache_clear()


@functools.cache
def get_tokenizer(model_name: str) -> Tokenizer:
    """The tokenizer of ``model_name`` (cached per name)."""
    from transformers import AutoTokenizer

    if model_name in _FACTORIES:
        return _FACTORIES[model_name]()
    if (Path(model_name).expanduser() / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(Path(model_name).expanduser())
    try:
        from tinker_backend import model_registry
    except ImportError:  # a client-only install
        models = None
    if models is not None:
        try:
            return AutoTokenizer.from_pretrained(model_registry.resolve_model(model_name))
        except model_registry.UnknownModelError:
            pass
    try:
        return AutoTokenizer.from_pretrained(model_name, local_files_only=True)
    except OSError as e:
        raise ConfigurationError(
            f"model_name: no tokenizer for {model_name!r} on this machine (offline); use "
            "training_client.get_tokenizer(), a local folder, or register_tokenizer()"
        ) from e


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text`` as token ids, without BOS/EOS."""
    return tokenizer.encode(text, add_special_tokens=False)
