"""Tokenizers by model name, for code that has no training client yet.

In a training loop prefer ``training_client.get_tokenizer()``. :func:`get_tokenizer` is for
code that has no client yet (datasets, tests, notebooks): it looks, in order, in the registry
of :func:`register_tokenizer`, in a local folder of that name, in the local Hugging Face cache
(offline), and otherwise asks the tinker backend (``$TINKER_BASE_URL``, or the embedded one)
for the model's tokenizer files, which is how ``tiny-llama`` and SmolLM2 are found. It never
downloads from the Hub.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from tinker_cookbook.model_files import local_model_folder, tokenizer_from_backend

Tokenizer = Any

_FACTORIES: dict[str, Callable[[], Tokenizer]] = {}


def register_tokenizer(model_name: str, factory: Callable[[], Tokenizer]) -> None:
    """Make :func:`get_tokenizer` build ``model_name``'s tokenizer with ``factory``."""
    _FACTORIES[model_name] = factory
    get_tokenizer.cache_clear()


@functools.cache
def get_tokenizer(model_name: str) -> Tokenizer:
    """The tokenizer of ``model_name`` (cached per name)."""
    if model_name in _FACTORIES:
        return _FACTORIES[model_name]()
    folder = local_model_folder(model_name, "tokenizer_config.json")
    if folder is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    return tokenizer_from_backend(model_name)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text`` as token ids, without BOS/EOS."""
    return tokenizer.encode(text, add_special_tokens=False)
