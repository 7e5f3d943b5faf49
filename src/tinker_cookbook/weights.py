"""Getting a run's weights out of tinker, as files other tools load as they are.

* :func:`download` fetches a checkpoint's files (``tinker://<run>/weights/<name>`` or
  ``.../sampler_weights/<name>``) from the backend into a folder.
* :func:`build_lora_adapter` turns a checkpoint folder into a plain PEFT adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``, no optimizer state) that
  ``peft.PeftModel.from_pretrained`` and vLLM's ``LoRARequest`` load without conversion.
* :func:`build_hf_model` merges an adapter into its base model and saves a full Hugging Face
  model (safetensors, tokenizer, chat template) that ``AutoModelForCausalLM.from_pretrained``
  and vLLM load as a plain model.

Getting weights in goes the other way round: ``ServiceClient.create_training_client_from_adapter
(base_model, adapter_dir)`` starts a run from a PEFT adapter made elsewhere (see
``docs/weights.md``).

>>> folder = download("tinker://<run>/sampler_weights/final", "ckpt")            # doctest: +SKIP
>>> adapter = build_lora_adapter(folder, "adapter")                               # doctest: +SKIP
>>> build_hf_model("path/to/base-model", adapter, "merged", dtype="bfloat16")     # doctest: +SKIP

The cookbook never imports the backend, and the backend sends tokenizers, not weights: the base
model of :func:`build_hf_model` is a local Hugging Face folder or a Hub id in the local HF cache.
It must hold the very weights the run was trained on (for the offline SmolLM2, the folder the
backend converted, ``~/.cache/tinker/models/SmolLM2-135M-Instruct``, not the Hub's weights).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import tinker
from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.model_files import local_model_folder

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DTYPES",
    "base_model_folder",
    "build_hf_model",
    "build_lora_adapter",
    "download",
    "read_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DTYPES = ("float32", "bfloat16", "float16")

_PREFIX = "base_model.model."
# Targets vLLM does not serve LoRA on (it serves LoRA on attention and MLP linears).
_NOT_IN_VLLM = ("lm_head",)


def download(
    tinker_path: str,
    out_dir: str | os.PathLike[str],
    *,
    rest_client: tinker.RestClient | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
) -> Path:
    """Fetch the files of the checkpoint at ``tinker_path`` into ``out_dir``; returns the folder.

    Uses ``rest_client``, else a new ``tinker.RestClient(base_url=..., api_key=...)`` (the
    server at ``$TINKER_BASE_URL``, or the embedded backend).
    """
    if not isinstance(tinker_path, str) or not tinker_path.startswith("tinker://"):
        raise ConfigurationError(
            f"tinker_path: expected 'tinker://<run_id>/<weights|sampler_weights>/<name>', got {tinker_path!r}"
        )
    rest = rest_client or tinker.RestClient(base_url=base_url, api_key=api_key)
    return Path(rest.download_checkpoint(tinker_path, out_dir).result())


def read_adapter(adapter_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, tuple[list[int], list[int]]]]:
    """A LoRA adapter folder's ``adapter_config.json`` and its modules' (A shape, B shape), checked:
    PEFT type LORA, a rank, and a lora_A [r, in] and a lora_B [out, r] per module."""
    folder = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise ConfigurationError(f"adapter_dir: expected a PEFT LoRA folder with {name}, got {str(folder)!r}")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ConfigurationError(f"{ADAPTER_CONFIG}: expected peft_type 'LORA', got {config.get('peft_type')!r}")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ConfigurationError(f"{ADAPTER_CONFIG}: expected r an int >= 1, got {rank!r}")
    shapes = _module_shapes(folder / ADAPTER_WEIGHTS)
    for path, (a, b) in shapes.items():
        if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise ConfigurationError(
                f"{ADAPTER_WEIGHTS}: {path}: expected lora_A [{rank}, in] and lora_B [out, {rank}], got {a} and {b}"
            )
    return config, shapes


def _module_shapes(weights_file: Path) -> dict[str, tuple[list[int], list[int]]]:
    from safetensors import safe_open

    halves: dict[str, dict[str, list[int]]] = {}
    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():
            if key.endswith(".base_layer.weight"):  # peft saves lm_head's and embed_tokens' base weight
                continue
            path, _, suffix = key.removeprefix(_PREFIX).rpartition(".lora_")
            if not key.startswith(_PREFIX) or suffix not in ("A.weight", "B.weight"):
                raise ConfigurationError(
                    f"{ADAPTER_WEIGHTS}: expected only '{_PREFIX}<module>.lora_A.weight' and '.lora_B.weight' "
                    f"tensors, got {key!r}"
                )
            halves.setdefault(path, {})[suffix[0]] = list(f.get_slice(key).get_shape())
    if not halves:
        raise ConfigurationError(f"{ADAPTER_WEIGHTS}: expected LoRA weights, got no tensors")
    missing = sorted(path for path, pair in halves.items() if set(pair) != {"A", "B"})
    if missing:
        raise ConfigurationError(f"{ADAPTER_WEIGHTS}: expected lora_A and lora_B for every module, got one for {missing}")
    return {path: (pair["A"], pair["B"]) for path, pair in sorted(halves.items())}


def build_lora_adapter(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    vllm: bool = False,
) -> Path:
    """A PEFT adapter folder from a checkpoint folder: its adapter files, checked, and nothing else
    (no optimizer state); returns ``out_dir``.

    ``base_model`` sets ``base_model_name_or_path`` (e.g. to a Hub id, for
    ``AutoPeftModelForCausalLM``). With ``vllm=True`` an adapter vLLM cannot serve (LoRA on
    ``lm_head``: train with ``train_unembed=False``, or merge it with :func:`build_hf_model`)
    raises ``ConfigurationError`` naming its modules.
    """
    source, out = Path(checkpoint_dir), Path(out_dir)
    if source.resolve() == out.resolve():
        raise ConfigurationError(f"out_dir: expected a folder other than checkpoint_dir, got {str(out)!r}")
    config, shapes = read_adapter(source)
    if vllm:
        unserved = [path for path in shapes if path.rpartition(".")[2] in _NOT_IN_VLLM]
        if unserved:
            raise ConfigurationError(
                f"checkpoint_dir: expected LoRA on attention and MLP layers only (vllm=True), got LoRA on {unserved}: "
                "train with train_unembed=False, or serve the merged model of build_hf_model"
            )
    config["inference_mode"] = True
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / ADAPTER_WEIGHTS, out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def base_model_folder(base_model: str | os.PathLike[str]) -> Path:
    """The local folder of ``base_model``'s weights: that folder, or its snapshot in the local
    Hugging Face cache (never downloads)."""
    folder = local_model_folder(str(base_model), "config.json")
    if folder is None or not any(folder.glob("*.safetensors")):
        raise ConfigurationError(
            f"base_model: expected a local Hugging Face model folder (config.json, *.safetensors) or a Hub id in the "
            f"local HF cache, got {str(base_model)!r} (the tinker backend sends tokenizers, not weights: "
            "`hf download <id>`, or pass the folder the backend loads, e.g. ~/.cache/tinker/models/<name>)"
        )
    return folder


def build_hf_model(
    base_model: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str = "float32",
) -> Path:
    """The adapter merged into its base model, saved as a Hugging Face model; returns ``out_dir``.

    ``base_model`` is a local model folder or a Hub id in the local HF cache (see
    :func:`base_model_folder`); ``adapter_dir`` a PEFT LoRA folder (a checkpoint folder will do).
    The merge is done in float32, then the weights are cast to ``dtype`` ("float32",
    "bfloat16" or "float16") and written as safetensors with the base's tokenizer, chat template
    and generation config. A LoRA on a tied output embedding unties it (the merged ``lm_head``
    gets its own weight), so the merged model computes exactly base + adapter.
    """
    if dtype not in DTYPES:
        raise ConfigurationError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = base_model_folder(base_model)
    _, shapes = read_adapter(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if any(path.rpartition(".")[2] == "lm_head" for path in shapes):
        _untie_output_embedding(model)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except RuntimeError as e:  # size mismatches: the adapter was made for another model shape
        raise ConfigurationError(f"adapter_dir: expected an adapter that fits {str(folder)!r}, got: {e}") from e
    merged.to(getattr(torch, dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    for name in ("chat_template.jinja", "generation_config.json"):  # when the savers above did not
        if (folder / name).is_file() and not (out / name).is_file():
            shutil.copyfile(folder / name, out / name)
    return out


def _untie_output_embedding(model: Any) -> None:
    """Give a tied ``lm_head`` its own copy of the weight, so a merge changes it alone."""
    import torch

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return
    head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = False
