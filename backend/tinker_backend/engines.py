"""The base models this server has loaded: one ``ModelScheduler`` (and engine) per base model.

A base model is loaded on first use, on its own compute thread; the registry
(``model_registry``) says where its weights are. No torch here: the engine module is imported
by the loader, on the compute thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinker.types import SupportedModel
from tinker_backend import model_registry
from tinker_backend.engine.protocol import Engine
from tinker_backend.errors import ServiceError
from tinker_backend.limits import Limits
from tinker_backend.scheduler import ModelScheduler
from tinker_backend.workers.config import Deployment, ModelPlacement

SAMPLER_KINDS = ("torch", "vllm")  # engine.model_engine's SAMPLERS, without importing torch here


class EnginePool:
    """One scheduler per base model, created on first use; closes them all at the end."""

    def __init__(
        self,
        data_dir: Path,
        limits: Limits,
        *,
        sampler: str | None,
        allow_local_models: bool,
        deployment: Deployment | None = None,
    ) -> None:
        """``sampler`` is ``"torch"`` or ``"vllm"`` (default: ``$TINKER_SAMPLER``, else torch);
        ``allow_local_models=False`` refuses base models named by a local folder; ``deployment``
        places each model (default: all in this process, ``workers.config``)."""
        self.sampler = sampler or os.environ.get("TINKER_SAMPLER") or "torch"
        if self.sampler not in SAMPLER_KINDS:
            raise ValueError(f"sampler: expected 'torch' or 'vllm', got {self.sampler!r}")
        self.data_dir = data_dir
        self.limits = limits
        self.allow_local_models = allow_local_models
        self.deployment = deployment or Deployment()
        self.deployment.check_sampler(self.sampler)
        self._groups: dict[str, Any] = {}  # base model -> its GroupEngine (--workers local)
        self._schedulers: dict[str, ModelScheduler] = {}
        self._paths: dict[str, Path] = {}  # base model -> its resolved folder

    async def scheduler(self, base_model: str) -> ModelScheduler:
        """The scheduler of ``base_model``, made on first use (its engine loads lazily); 404 if
        unknown. Finding the weights may download them (in a thread, off the event loop)."""
        if base_model not in self._schedulers:
            path = await self.model_path(base_model)
            if base_model in self._schedulers:  # made by another request meanwhile
                return self._schedulers[base_model]
            self._schedulers[base_model] = ModelScheduler(
                base_model,
                lambda: self._load(base_model, path),
                max_runs_per_cycle=self._slots(self.deployment.placement(base_model)),
                max_tokens_per_cycle=self.limits.max_tokens_per_cycle,
            )
        return self._schedulers[base_model]

    def schedulers(self) -> list[ModelScheduler]:
        """The schedulers made so far (for metrics and the console)."""
        return list(self._schedulers.values())

    async def model_path(self, base_model: str) -> Path:
        """The folder of ``base_model``'s weights, found once (in a thread: it may download); 404
        if unknown."""
        if base_model not in self._paths:
            self.check_model_name(base_model)
            try:
                self._paths[base_model] = await asyncio.to_thread(model_registry.resolve_model, base_model)
            except model_registry.UnknownModelError as e:
                raise ServiceError(404, f"base_model: {e}") from e
        return self._paths[base_model]

    async def architecture(self, base_model: str) -> str:
        """The model's ``model_type`` from its ``config.json`` ("unknown" if its weights are gone)."""
        try:
            path = await self.model_path(base_model)
        except ServiceError:
            return "unknown"
        return model_registry.architecture_of(path).model_type or "unknown"

    def loaded(self, base_model: str) -> ModelScheduler | None:
        """The scheduler of ``base_model`` if it was made, else None (nothing is loaded)."""
        return self._schedulers.get(base_model)

    def _slots(self, placement: ModelPlacement) -> int:
        return placement.max_adapter_slots or self.limits.adapter_slots

    def _load(self, base_model: str, path: Path) -> Engine:
        placement = self.deployment.placement(base_model)
        if self.deployment.workers == "inprocess":
            device = placement.devices[0] if placement.devices else None
            return self._engine(base_model, path, placement, device)
        from tinker_backend.workers.group import GroupSpec, TrainerGroup
        from tinker_backend.workers.local import GroupEngine

        spec = GroupSpec(
            base_model, path, ranks=placement.trainer_ranks, devices=placement.devices or (),
            dtype=placement.dtype, engine_options=self._engine_options(base_model, placement),
        )
        start_group: Callable[[GroupSpec], Any] = TrainerGroup
        if self.deployment.workers == "ray":
            from tinker_backend.workers import ray_driver, ray_group

            actors = spec.ranks + placement.sampler_replicas  # one CPU each
            ray_driver.connect(self.deployment.ray_address, num_cpus=max(os.cpu_count() or 1, actors))
            start_group = ray_group.RayTrainerGroup
        group = GroupEngine(spec, lambda: self._sampler_pool(base_model, path, placement),
                            placement=self.deployment.workers, start_group=start_group,
                            # A Ray group's liveness is read from pids, which only works for actors
                            # on this node: no supervisor there; a dead group restarts at its next request.
                            supervise=self.deployment.workers == "local")
        self._groups[base_model] = group
        return group

    def _sampler_pool(self, base_model: str, path: Path, placement: ModelPlacement) -> Any:
        """The model's ``sampler_replicas`` sampler workers: local processes, or Ray actors with
        ``--workers ray``; they load the adapter versions the group publishes under the data dir."""
        from tinker_backend.workers.sampler_pool import SamplerPool, StartReplica
        from tinker_backend.workers.sampler_worker import SamplerProcess, SamplerSpec, default_threads

        device = placement.devices[0].split(":")[0] if placement.devices else None
        spec = SamplerSpec(base_model, path, device, placement.dtype, default_threads(placement.sampler_replicas),
                           sampler=placement.sampler or self.sampler,
                           sampler_dir=self.data_dir / "sampler-adapters" / _safe_name(base_model),
                           max_lora_rank=self.limits.max_lora_rank)
        start: StartReplica = SamplerProcess
        if self.deployment.workers == "ray":
            from tinker_backend.workers.ray_sampler import RaySampler

            start = RaySampler
        return SamplerPool(spec, placement.sampler_replicas, self.data_dir / "published" / _safe_name(base_model),
                           max_in_flight=placement.sampler_max_in_flight, start=start)

    def _engine_options(self, base_model: str, placement: ModelPlacement) -> dict[str, Any]:
        return {
            "max_slots": self._slots(placement),
            "max_host_adapters": self.limits.host_adapters,
            "offload_dir": self.data_dir / "offload" / _safe_name(base_model),
            "max_lora_rank": self.limits.max_lora_rank,
            "checkpoint_tokens": self.limits.checkpoint_tokens or None,
        }

    def _engine(self, base_model: str, path: Path, placement: ModelPlacement, device: str | None) -> Engine:
        import torch

        from tinker_backend.engine.model_engine import ModelEngine

        return ModelEngine(
            base_model,
            path,
            device,
            getattr(torch, placement.dtype) if placement.dtype else None,
            sampler=placement.sampler or self.sampler,
            sampler_dir=self.data_dir / "sampler-adapters" / _safe_name(base_model),
            **self._engine_options(base_model, placement),
        )

    def health(self) -> dict[str, Any]:
        """Per base model trained by worker processes: their state (for ``/api/v1/healthz``)."""
        return {name: group.health() for name, group in self._groups.items()}

    def check_model_name(self, base_model: str) -> None:
        """A local folder is a path into the server's file system: only served when allowed."""
        if not self.allow_local_models and (Path(base_model).expanduser() / "config.json").is_file():
            raise ServiceError(
                404,
                f"base_model: expected a model this server serves (see get_server_capabilities), got the "
                f"local folder {base_model!r} (tinker-server --allow-local-models serves those)",
            )

    def tokenizer_files(self, base_model: str) -> dict[str, bytes]:
        """The files of ``base_model``'s tokenizer (blocking: call it in a thread)."""
        self.check_model_name(base_model)
        try:
            return model_registry.tokenizer_files(base_model)
        except model_registry.UnknownModelError as e:
            raise ServiceError(404, f"base_model: {e}") from e

    @staticmethod
    def capabilities() -> list[SupportedModel]:
        return model_registry.list_models()

    def close(self) -> None:
        if self.deployment.workers == "ray" and self._groups:
            from tinker_backend.workers import ray_driver

            ray_driver.cancel_abort_alarm()
        for scheduler in self._schedulers.values():
            scheduler.close()
        for group in self._groups.values():  # their worker processes or actors
            group.close()
        if self.deployment.workers == "ray" and self._groups:
            from tinker_backend.workers import ray_driver

            ray_driver.disconnect()  # after the actors are gone; before exit (docs/scaling.md, Shutdown)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
