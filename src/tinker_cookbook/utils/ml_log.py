"""Metrics logging: ``metrics.jsonl`` and ``config.json`` in the run folder, a console table,
optional Weights & Biases, and a PNG of the curves (``metrics.png``) next to the metrics.

>>> logger = MetricsLogger("runs/demo", config={"lr": 1e-4})   # doctest: +SKIP
>>> logger.log_metrics({"train_mean_nll": 2.3}, step=0)         # doctest: +SKIP
>>> logger.close()                                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.utils.plotting import plot_metrics

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Append one JSON line per step to ``log_path/metrics.jsonl`` and mirror it elsewhere.

    ``resume_step``: when resuming a run, rows with ``step >= resume_step`` are dropped from
    an existing ``metrics.jsonl`` (they belong to steps that will run again); otherwise the
    file starts empty. ``plot_every``: redraw ``metrics.png`` every that many logged steps
    (and on ``close``). ``wandb_project``: also log to wandb (``pip install wandb``).
    """

    def __init__(
        self,
        log_path: str | Path,
        config: Any = None,
        *,
        resume_step: int | None = None,
        print_table: bool = True,
        plot_keys: Sequence[str] | None = None,
        plot_every: int = 5,
        wandb_project: str | None = None,
        wandb_name: str | None = None,
    ) -> None:
        self.log_path = Path(log_path)
        self.log_path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.log_path / "metrics.jsonl"
        self.plot_path = self.log_path / "metrics.png"
        self.print_table = print_table
        self.plot_keys = plot_keys
        self.plot_every = plot_every
        self._logged = 0
        kept = []
        if resume_step is not None and self.metrics_path.exists():
            with open(self.metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) < resume_step]
        self.metrics_path.write_text("".join(kept))
        config_dict = _to_jsonable(config) if config is not None else None
        if config_dict is not None:
            (self.log_path / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigurationError("wandb_project: set, but wandb is not installed (pip install wandb)") from None
            self._wandb = wandb.init(project=wandb_project, name=wandb_name, config=config_dict, dir=str(self.log_path))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record ``metrics`` for ``step`` everywhere this logger writes."""
        row = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.print_table:
            print(format_table(row), flush=True)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)
        self._logged += 1
        if self.plot_every and self._logged % self.plot_every == 0:
            self.plot()

    def plot(self) -> Path | None:
        """Redraw ``metrics.png`` from ``metrics.jsonl``."""
        return plot_metrics(self.metrics_path, self.plot_path, self.plot_keys)

    def close(self) -> None:
        self.plot()
        if self._wandb is not None:
            self._wandb.finish()


def format_table(row: Mapping[str, Any]) -> str:
    """A two-column table of ``row`` (keys sorted, ``step`` first)."""
    items = sorted(row.items(), key=lambda kv: (kv[0] != "step", kv[0]))
    width = max(len(k) for k, _ in items)
    lines = [f"{k:<{width}}  {_fmt(v)}" for k, v in items]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)
