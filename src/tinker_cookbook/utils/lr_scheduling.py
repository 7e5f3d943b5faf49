"""Learning-rate schedules: a multiplier on the base learning rate for each step."""

from __future__ import annotations

import math
from typing import Literal

LRSchedule = Literal["linear", "cosine", "constant"]


def lr_multiplier(schedule: LRSchedule, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The factor for ``step`` (0-based) of ``total_steps``.

    ``linear`` decays ``1 - t`` and ``cosine`` ``(1 + cos(pi t)) / 2`` with ``t = step /
    total_steps`` (so the last step still has a small non-zero rate); ``constant`` is 1.
    The first ``warmup_steps`` ramp up linearly, ``(step + 1) / warmup_steps``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(step / total_steps, 1.0)
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"lr_schedule: expected 'linear', 'cosine' or 'constant', got {schedule!r}")
