"""A base model's files (``config.json``, tokenizer) for code that has no training client.

The cookbook never imports the backend. It looks, in order:

1. in a local folder of that name;
2. in the local Hugging Face cache (offline: never downloads);
3. through the tinker client, which asks its backend (the server at ``$TINKER_BASE_URL``, or
   the embedded one) for the model's tokenizer files, ``config.json`` among them. This is how
   models the backend builds itself (``tiny-llama``, SmolLM2 from its GGUF) are found.

>>> load_model_config("tiny-llama")["hidden_size"]   # doctest: +SKIP
128
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tinker
from tinker_cookbook.exceptions import ConfigurationError


def local_model_folder(model_name: str, needs: str) -> Path | None:
    """A folder holding ``needs`` (e.g. ``"config.json"``) for ``model_name``: the folder of
    that name, or its snapshot in the local Hugging Face cache; None if neither has it."""
    folder = Path(model_name).expanduser()
    if (folder / needs).is_file():
        return folder
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_name, local_files_only=True))
    except Exception:  # not cached, not a valid id, or huggingface_hub missing: all mean "not here"
        return None
    return folder if (folder / needs).is_file() else None


def _service_client() -> tinker.ServiceClient:
    try:
        return tinker.ServiceClient()
    except ImportError as e:  # no $TINKER_BASE_URL and no backend installed to embed
        raise ConfigurationError(
            "model_name: not on this machine, and no backend to ask: set TINKER_BASE_URL "
            "(or install the backend)"
        ) from e


def _unknown(model_name: str, e: Exception) -> ConfigurationError:
    return ConfigurationError(f"model_name: {model_name!r} not on this machine, and the backend says: {e}")


def files_from_backend(model_name: str) -> dict[str, bytes]:
    """The model's tokenizer files and ``config.json``, by file name, from the tinker backend."""
    with _service_client() as service:
        try:
            return service.get_base_model_files(model_name).result()
        except (tinker.NotFoundError, tinker.BadRequestError) as e:
            raise _unknown(model_name, e) from e


def tokenizer_from_backend(model_name: str) -> Any:
    """The model's tokenizer, rebuilt from the files the tinker backend sends (cached on disk)."""
    with _service_client() as service:
        try:
            return service.get_tokenizer(model_name)
        except (tinker.NotFoundError, tinker.BadRequestError) as e:
            raise _unknown(model_name, e) from e


def load_model_config(model_name: str) -> dict[str, Any]:
    """``config.json`` of ``model_name``: local folder, Hugging Face cache, else the backend."""
    folder = local_model_folder(model_name, "config.json")
    if folder is not None:
        return json.loads((folder / "config.json").read_text())
    files = files_from_backend(model_name)
    if "config.json" not in files:
        raise ConfigurationError(f"model_name: the backend sent no config.json for {model_name!r}")
    return json.loads(files["config.json"])
