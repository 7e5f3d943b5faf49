"""Per-run history: one row per optimizer step, built from numbers the server already computes.

Between two ``optim_step``s of a run, its ``forward_backward`` answers (loss sum, token and
weight counts, clock-cycle time) and the tokens sampled from its samplers add up here; the
``optim_step`` answer (learning rate, gradient norm before clipping) closes the step and writes
one :class:`~tinker_backend.store.HistoryPoint` to the store. Pure forwards are not training and
are not counted. Lives on the event loop; the store bounds each run's rows (``max_points``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tinker import wire
from tinker.types import Datum, ForwardBackwardOutput, OptimStepResponse
from tinker_backend.store import HistoryPoint, Store

# Rows kept per run: past this, older steps are thinned (a curve of 2000 points still reads well).
MAX_POINTS_PER_RUN = 2000


@dataclass
class _Open:
    """What a run has done since its last optimizer step."""

    started: float | None = None  # when its first training request arrived
    loss_sum: float = 0.0
    has_loss: bool = False
    weight_sum: float = 0.0
    tokens: int = 0
    cycle_seconds: float = 0.0
    sampled_tokens: int = 0


class RunHistory:
    """Collects each run's open step and writes it when its ``optim_step`` answers."""

    def __init__(
        self, store: Store, max_points: int = MAX_POINTS_PER_RUN, write: Callable[[HistoryPoint], None] | None = None
    ) -> None:
        """``write`` stores a finished step (default: ``store.add_history`` at once; the server
        passes ``WriteBatch.add_history``, which commits it with the answers of the same turn)."""
        self.store = store
        self.max_points = max_points
        self._write = write or (lambda point: store.add_history(point, max_points))
        self._open: dict[str, _Open] = {}
        self._last: dict[str, tuple[int, int]] = {}  # run id -> (its last recorded step, tokens_total)

    def _step_of(self, run_id: str, arrived: float | None = None) -> _Open:
        step = self._open.setdefault(run_id, _Open())
        if step.started is None:
            step.started = arrived
        return step

    def answered(self, run_id: str, request: wire.TrainingRequest, result: Any, arrived: float) -> None:
        """Note a training request's successful answer; ``arrived`` is when the request came
        (``time.time()``): a step's time runs from its first request's arrival to its answer."""
        if isinstance(request, wire.ForwardBackward) and not request.forward_only:
            if isinstance(result, ForwardBackwardOutput):
                self._forward_backward(self._step_of(run_id, arrived), request.data, result)
        elif isinstance(request, wire.OptimStep) and isinstance(result, OptimStepResponse):
            self._optim_step(run_id, self._step_of(run_id, arrived), result.metrics or {})

    def sampled(self, run_id: str, tokens: int) -> None:
        """Count ``tokens`` sampled from one of the run's samplers in its open step."""
        self._step_of(run_id).sampled_tokens += tokens

    def forget(self, run_id: str) -> None:
        """Drop a run's open step (its run was unloaded; its recorded rows stay)."""
        self._open.pop(run_id, None)

    @staticmethod
    def _forward_backward(step: _Open, data: list[Datum], result: ForwardBackwardOutput) -> None:
        if "loss:sum" in result.metrics:
            step.loss_sum += result.metrics["loss:sum"]
            step.has_loss = True
        step.weight_sum += sum(_weight(d) for d in data)
        step.tokens += sum(d.model_input.length for d in data)
        step.cycle_seconds += result.metrics.get("cycle_seconds:max", 0.0)

    def _optim_step(self, run_id: str, step: _Open, metrics: dict[str, float]) -> None:
        del self._open[run_id]
        if run_id not in self._last:  # after a restart, go on after the rows already stored
            stored = self.store.last_history([run_id]).get(run_id)
            self._last[run_id] = (stored.step, stored.tokens_total) if stored is not None else (0, 0)
        number, tokens_total = self._last[run_id][0] + 1, self._last[run_id][1] + step.tokens
        now = time.time()
        point = HistoryPoint(
            run_id=run_id,
            step=number,
            at=now,
            loss_sum=step.loss_sum if step.has_loss else None,
            weight_sum=step.weight_sum,
            tokens=step.tokens,
            tokens_total=tokens_total,
            learning_rate=metrics.get("learning_rate:max"),
            grad_norm=metrics.get("grad_norm:max"),
            step_seconds=now - step.started if step.started is not None else None,
            cycle_seconds=step.cycle_seconds,
            sampled_tokens=step.sampled_tokens,
        )
        self._write(point)
        self._last[run_id] = (number, tokens_total)


def _weight(datum: Datum) -> float:
    """The datum's total loss weight (its ``weights`` input), or its target count without one."""
    weights = datum.loss_fn_inputs.get("weights")
    if weights is None:
        return float(datum.model_input.length)
    return float(sum(weights.data))
