"""Hyper-parameter rules for LoRA: the learning rate and the number of trained parameters.

The LR rule is Tinker's: ``lr = 5e-5 * 10 * (2000 / hidden_size) ** e``, where 10 is the
LoRA-over-full-fine-tuning factor (it holds with LoRA alpha fixed at 32, as this backend and
Tinker use) and ``e`` is 0.781 for Llama-architecture models and 0.0775 for Qwen. The exponents
were fitted by Thinking Machines on their sweeps; SmolLM2 and the tiny test model are Llamas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.model_files import load_model_config

LORA_OVER_FULL_FINETUNE_LR = 10.0
_BASE_LR = 5e-5
_EXPONENTS = {"llama": 0.781, "qwen": 0.0775}

# (hidden size, family) of models whose config may not be on this machine; any other model's
# config.json comes from model_files (a local folder, the Hugging Face cache or the backend).
_KNOWN = {
    "tiny-llama": (128, "llama"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": (576, "llama"),
    "meta-llama/Llama-3.2-1B": (2048, "llama"),
    "meta-llama/Llama-3.2-3B": (3072, "llama"),
    "meta-llama/Llama-3.1-8B": (4096, "llama"),
    "meta-llama/Llama-3.1-70B": (8192, "llama"),
    "Qwen/Qwen3-4B": (2560, "qwen"),
    "Qwen/Qwen3-8B": (4096, "qwen"),
    "Qwen/Qwen3-32B": (5120, "qwen"),
}


def _family(model_name: str, config: Mapping[str, Any]) -> str:
    text = (model_name + " " + str(config.get("model_type", ""))).lower()
    for family in ("qwen", "llama"):
        if family in text:
            return family
    raise ConfigurationError(
        f"model_name: the LR rule is calibrated for Llama and Qwen models only, got {model_name!r}; "
        "pass learning_rate= explicitly"
    )


def get_lr(model_name: str, is_lora: bool = True) -> float:
    """The recommended learning rate for ``model_name`` (LoRA by default)."""
    if model_name in _KNOWN:
        hidden, family = _KNOWN[model_name]
    else:
        config = load_model_config(model_name)
        found = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
        if not isinstance(found, int):
            raise ConfigurationError(f"model_name: {model_name!r} config has no hidden_size")
        hidden, family = found, _family(model_name, config)
    exponent = _EXPONENTS[family]
    return _BASE_LR * (LORA_OVER_FULL_FINETUNE_LR if is_lora else 1.0) * (2000 / hidden) ** exponent


def get_lora_param_count(
    model: str | Mapping[str, Any],
    lora_rank: int = 32,
    train_mlp: bool = True,
    train_attn: bool = True,
    train_unembed: bool = True,
) -> int:
    """Trainable LoRA parameters of a Llama/Qwen-style decoder: ``rank * (in + out)`` for each
    adapted linear (q, k, v, o; gate, up, down; lm_head), from a config dict or a model name."""
    config = load_model_config(model) if isinstance(model, str) else model
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    layers = config["num_hidden_layers"]
    attn = (hidden + heads * head_dim) * 2 + (hidden + kv_heads * head_dim) * 2  # q, o; k, v
    mlp = (hidden + inter) * 3  # gate, up, down
    per_rank = layers * (attn * train_attn + mlp * train_mlp) + (hidden + config["vocab_size"]) * train_unembed
    return lora_rank * per_rank
