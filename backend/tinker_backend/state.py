"""What the modules behind the request handler share: one of each per data dir."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tinker_backend.checkpoint_index import CheckpointIndex
from tinker_backend.engines import EnginePool
from tinker_backend.history import RunHistory
from tinker_backend.limits import Limits
from tinker_backend.metrics import ServerMetrics
from tinker_backend.store import Store
from tinker_backend.tenancy import Ledger
from tinker_backend.write_batch import WriteBatch


@dataclass
class Shared:
    """The store, the ledger, the engines, the checkpoint index, the limits, the per-run history,
    the metrics, the batched store writes of answers, and the lock
    under which runs and samplers load and unload (one at a time, across both modules)."""

    store: Store
    ledger: Ledger
    engines: EnginePool
    checkpoints: CheckpointIndex
    limits: Limits
    history: RunHistory
    metrics: ServerMetrics
    writes: WriteBatch
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
