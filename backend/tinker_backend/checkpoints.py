"""LoRA checkpoints on disk: PEFT-format adapters plus optional optimizer state, written atomically.

A checkpoint directory holds:

* ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` [r, in] and
  ``.lora_B.weight`` [out, r] in fp32, and
* ``adapter_config.json``: a PEFT ``LoraConfig``,

so ``peft.PeftModel.from_pretrained(base, directory)`` and vLLM load it without conversion.
Training checkpoints add ``optimizer.pt`` (the AdamW ``state_dict``) and ``tinker_state.json``
(the Tinker ``LoraConfig`` with its seed, the base model and the step count).

Every save builds the whole directory under a temporary name next to the destination, fsyncs
it, and only then renames it into place, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch
from safetensors.torch import load_file, save_file

from tinker.types import LoraConfig

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "OPTIMIZER_STATE",
    "TINKER_STATE",
    "AdapterCheckpoint",
    "atomic_directory",
    "peft_target_modules",
    "read_checkpoint",
    "write_checkpoint",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_STATE = "optimizer.pt"
TINKER_STATE = "tinker_state.json"

_PREFIX = "base_model.model."
_BASE_LAYER = ".base_layer.weight"
_FORMAT_VERSION = 1


@dataclass
class AdapterCheckpoint:
    """An adapter as stored: weights by module path, all of one rank and one scaling.

    ``lora_config`` and ``step`` come from ``tinker_state.json`` (None and 0 for a plain PEFT
    directory); ``optimizer_state`` is set only when saved and asked for.
    """

    base_model: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    lora_alpha: float
    target_modules: list[str]
    lora_config: LoraConfig | None = None
    step: int = 0
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False)
    # Base weights some PEFT adapters carry (peft saves lm_head's and embed_tokens'), by module path.
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        return next(iter(self.weights.values()))[0].shape[0]


def peft_target_modules(targets: list[str], all_paths: list[str]) -> list[str]:
    """PEFT ``target_modules`` for the module paths ``targets`` out of ``all_paths``.

    Leaf names (``q_proj``, ``lm_head``) when they select exactly ``targets``, as vLLM expects;
    full paths otherwise (PEFT matches a path exactly), e.g. if attention and MLP share a leaf name.
    """
    leaves = sorted({path.rpartition(".")[2] for path in targets})
    selected = [p for p in all_paths if p.rpartition(".")[2] in leaves]
    return leaves if sorted(selected) == sorted(targets) else sorted(targets)


@contextmanager
def atomic_directory(destination: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``destination`` once the block succeeds.

    The temporary directory sits in the same parent (so the rename is atomic on one file system).
    An existing destination is moved aside only after the new content is complete and fsynced,
    then removed; if the block fails, the temporary directory is removed and nothing changes.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        yield tmp
        for path in tmp.iterdir():
            _fsync(path)
        _fsync(tmp)
        if destination.exists():
            old = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.old")
            os.replace(destination, old)
            os.replace(tmp, destination)
            shutil.rmtree(old)
        else:
            os.replace(tmp, destination)
        _fsync(destination.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(directory: Path, checkpoint: AdapterCheckpoint) -> None:
    """Write ``checkpoint`` atomically; the Tinker files only when it has a ``lora_config``."""
    tensors = {}
    for path, (A, B) in checkpoint.weights.items():
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = A.detach().float().cpu().contiguous()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = B.detach().float().cpu().contiguous()
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": checkpoint.base_model,
        "r": checkpoint.rank,
        "lora_alpha": checkpoint.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": checkpoint.target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with atomic_directory(directory) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))
        if checkpoint.optimizer_state is not None:
            torch.save(checkpoint.optimizer_state, tmp / OPTIMIZER_STATE)
        if checkpoint.lora_config is not None:
            state = {
                "format_version": _FORMAT_VERSION,
                "base_model": checkpoint.base_model,
                "lora_config": msgspec.to_builtins(checkpoint.lora_config),
                "step": checkpoint.step,
                "has_optimizer": checkpoint.optimizer_state is not None,
            }
            (tmp / TINKER_STATE).write_text(json.dumps(state, indent=2))


def read_checkpoint(directory: Path, *, with_optimizer: bool = False) -> AdapterCheckpoint:
    """Read a checkpoint written by ``write_checkpoint`` or any PEFT LoRA adapter of one rank.

    Unsupported PEFT options are reported together in one ValueError. ``with_optimizer`` loads
    ``optimizer.pt`` (on CPU) and fails if the checkpoint has none.
    """
    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            hint = " (it has adapter_model.bin: save it with safetensors)" if (directory / "adapter_model.bin").is_file() else ""
            raise FileNotFoundError(f"{directory}: not a LoRA checkpoint (no {name}){hint}")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    _check_peft_config(directory, config)
    tensors = load_file(directory / ADAPTER_WEIGHTS)
    base_weights = {
        key.removeprefix(_PREFIX).removesuffix(_BASE_LAYER): tensors.pop(key)
        for key in list(tensors)
        if key.startswith(_PREFIX) and key.endswith(_BASE_LAYER)
    }
    weights = _split_weights(directory, tensors)
    rank = int(config["r"])
    ranks = {A.shape[0] for A, _ in weights.values()}
    if ranks != {rank}:
        raise ValueError(f"{directory}: adapter_config r={rank} but the weights have ranks {sorted(ranks)}")
    alpha = float(config.get("lora_alpha", 8))
    scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    target_modules = config.get("target_modules") or []
    checkpoint = AdapterCheckpoint(
        base_model=str(config.get("base_model_name_or_path") or ""),
        weights=weights,
        scaling=scaling,
        lora_alpha=alpha,
        target_modules=[target_modules] if isinstance(target_modules, str) else list(target_modules),
        base_weights=base_weights,
    )
    if (directory / TINKER_STATE).is_file():
        state = json.loads((directory / TINKER_STATE).read_text())
        checkpoint.lora_config = msgspec.convert(state["lora_config"], LoraConfig)
        checkpoint.step = int(state.get("step", 0))
        checkpoint.base_model = state.get("base_model", checkpoint.base_model)
    if with_optimizer:
        if not (directory / OPTIMIZER_STATE).is_file():
            raise FileNotFoundError(f"{directory}: the checkpoint has no optimizer state ({OPTIMIZER_STATE})")
        checkpoint.optimizer_state = torch.load(
            directory / OPTIMIZER_STATE, map_location="cpu", weights_only=True
        )
    return checkpoint


# PEFT LoRA options that change what the adapter computes (or what it holds) beyond x @ A.T @ B.T.
_CHANGES_THE_FORWARD = (
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
)


def _check_peft_config(directory: Path, config: dict[str, Any]) -> None:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA)")
    if config.get("use_dora"):
        problems.append("use_dora=true")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r} (only 'none')")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=true")
    if config.get("lora_bias"):
        problems.append("lora_bias=true")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", *_CHANGES_THE_FORWARD):
        if config.get(key):
            problems.append(f"{key}={config[key]!r} (only unset)")
    if problems:
        raise ValueError(
            f"{directory}: unsupported adapter_config.json settings (a plain LoRA of one rank and alpha on "
            "linear layers is expected): " + "; ".join(problems)
        )


def _split_weights(
    directory: Path, tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path, _, suffix = key.removeprefix(_PREFIX).rpartition(".lora_")
        if suffix.startswith("embedding_"):
            raise ValueError(
                f"{directory}: {path}: LoRA on an embedding ({key!r}) is not supported; expected LoRA on "
                "linear layers only (attention, MLP, lm_head)"
            )
        if not key.startswith(_PREFIX) or suffix not in ("A.weight", "B.weight"):
            raise ValueError(
                f"{directory}: unexpected tensor {key!r} in {ADAPTER_WEIGHTS}; expected only "
                f"'{_PREFIX}<module>.lora_A.weight' and '.lora_B.weight'"
            )
        halves.setdefault(path, {})[suffix[0]] = tensor.float()
    weights = {}
    for path, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{directory}: module {path!r} lacks lora_A or lora_B")
        weights[path] = (pair["A"], pair["B"])
    if not weights:
        raise ValueError(f"{directory}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return weights
