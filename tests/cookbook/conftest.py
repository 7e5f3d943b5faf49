"""Fixtures for the cookbook tests: the tiny model's tokenizer and an isolated embedded backend."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tinker_cookbook.tokenizer_utils import get_tokenizer

TINY = "tiny-llama"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return get_tokenizer(TINY)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[None]:
    """Loops create their own ``ServiceClient()``: make sure it is the embedded backend."""
    saved = os.environ.pop("TINKER_BASE_URL", None)
    yield
    if saved is not None:
        os.environ["TINKER_BASE_URL"] = saved
