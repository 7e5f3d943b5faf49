"""Where each run's adapter lives: in a slot on the device, in host memory, or on disk.

Runs can outnumber slots. The table keeps at most ``max_slots`` adapters attached to the LoRA
layers on the device; the least recently used of the others wait in host memory (at most
``max_host``) and the rest on disk, and come back when they are next used. An adapter moves
with everything that makes training resume exactly: weights, gradients accumulated since the
last ``optim_step``, AdamW state and step count. Nothing is ever dropped, so no request is ever
answered "evicted".
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import torch

from tinker.types import LoraConfig

from .lora import LoraLinear
from .trainer import TrainableAdapter


class AdapterTable:
    """LRU residency of trainable adapters across three tiers: slot, host memory, disk."""

    def __init__(
        self,
        layers: Mapping[str, LoraLinear],
        device: torch.device,
        *,
        max_slots: int,
        max_host: int,
        offload_dir: Path | None,
    ) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots: expected >= 1, got {max_slots}")
        self._layers = layers
        self._device = device
        self.max_slots = max_slots
        self.max_host = max_host
        self._offload_dir = offload_dir
        self._slots: OrderedDict[str, TrainableAdapter] = OrderedDict()  # oldest first
        self._host: OrderedDict[str, TrainableAdapter] = OrderedDict()
        self._disk: dict[str, Path] = {}
        self.events = {"hit": 0, "miss": 0, "offload": 0}  # acquire()s found in / brought to a slot; moved out

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._slots or adapter_id in self._host or adapter_id in self._disk

    def __len__(self) -> int:
        return len(self._slots) + len(self._host) + len(self._disk)

    def tiers(self) -> dict[str, int]:
        """How many adapters are in each tier (for metrics and tests)."""
        return {"slots": len(self._slots), "host": len(self._host), "disk": len(self._disk)}

    def add(self, adapter_id: str, adapter: TrainableAdapter) -> None:
        """Put a new (or replacing) adapter in a slot, making room if needed."""
        self.remove(adapter_id)
        self._make_room(1, keep=())
        adapter.attach(self._layers)
        self._slots[adapter_id] = adapter

    def remove(self, adapter_id: str) -> None:
        if adapter_id in self._slots:
            self._slots.pop(adapter_id).detach(self._layers)
        self._host.pop(adapter_id, None)
        path = self._disk.pop(adapter_id, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def get(self, adapter_id: str) -> TrainableAdapter:
        """The adapter, in a slot (brought back from host memory or disk if it was away)."""
        return self.acquire([adapter_id])[adapter_id]

    def acquire(self, adapter_ids: Iterable[str]) -> dict[str, TrainableAdapter]:
        """Make all of ``adapter_ids`` resident together (for one merged pass) and mark them used."""
        wanted = list(dict.fromkeys(adapter_ids))
        for adapter_id in wanted:
            if adapter_id not in self:
                raise KeyError(f"adapter_id: no adapter {adapter_id!r}")
        if len(wanted) > self.max_slots:
            raise ValueError(
                f"one pass needs {len(wanted)} adapters but the engine has {self.max_slots} slots"
            )
        missing = [a for a in wanted if a not in self._slots]
        self.events["hit"] += len(wanted) - len(missing)
        self.events["miss"] += len(missing)
        self._make_room(len(missing), keep=wanted)
        for adapter_id in missing:
            adapter = self._host.pop(adapter_id, None) or self._load(adapter_id)
            adapter.to(self._device)
            adapter.attach(self._layers)
            self._slots[adapter_id] = adapter
        for adapter_id in wanted:
            self._slots.move_to_end(adapter_id)
        return {a: self._slots[a] for a in wanted}

    def in_slot(self, adapter_id: str) -> bool:
        """Whether ``adapter_id`` is attached on the device now (``get`` would not move any)."""
        return adapter_id in self._slots

    def resident(self) -> list[TrainableAdapter]:
        return list(self._slots.values())

    # --- eviction ---

    def _make_room(self, needed: int, keep: Iterable[str]) -> None:
        keep = set(keep)
        while len(self._slots) + needed > self.max_slots:
            victim = next(a for a in self._slots if a not in keep)
            adapter = self._slots.pop(victim)
            self.events["offload"] += 1
            adapter.detach(self._layers)
            adapter.to(torch.device("cpu"))
            self._host[victim] = adapter
        while len(self._host) > self.max_host:
            victim, adapter = self._host.popitem(last=False)
            self._disk[victim] = self._save(victim, adapter)

    def _save(self, adapter_id: str, adapter: TrainableAdapter) -> Path:
        if self._offload_dir is None:
            raise RuntimeError(
                f"adapter {adapter_id!r} must leave host memory (max_host={self.max_host}) "
                "but the engine has no offload_dir"
            )
        self._offload_dir.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {
            "key": adapter.key,
            "config": msgspec.to_builtins(adapter.config),
            "scaling": adapter.scaling,
            "weights": {p: (A.data, B.data) for p, (A, B) in adapter.weights.items()},
            "grads": {p: (A.grad, B.grad) for p, (A, B) in adapter.weights.items()},
            "optimizer": adapter.optimizer.state_dict(),
            "step": adapter.step,
        }
        fd, tmp = tempfile.mkstemp(dir=self._offload_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        path = self._offload_dir / f"{uuid.uuid4().hex}.pt"
        os.replace(tmp, path)
        return path

    def _load(self, adapter_id: str) -> TrainableAdapter:
        path = self._disk.pop(adapter_id)
        state = torch.load(path, map_location="cpu", weights_only=False)
        path.unlink(missing_ok=True)
        adapter = TrainableAdapter(
            state["key"], LoraConfig(**state["config"]), state["weights"], state["scaling"], torch.device("cpu")
        )
        for (A, B), (grad_a, grad_b) in zip(adapter.weights.values(), state["grads"].values(), strict=True):
            A.grad, B.grad = grad_a, grad_b
        adapter.optimizer.load_state_dict(state["optimizer"])
        adapter.step = state["step"]
        return adapter
