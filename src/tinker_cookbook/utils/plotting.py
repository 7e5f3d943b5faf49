"""A PNG of the training curves in ``metrics.jsonl``, written next to it (needs matplotlib)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

# Curves drawn by default, when present, in this order.
DEFAULT_CURVES = (
    "train_mean_nll",
    "test/nll",
    "reward/total",
    "test/reward/total",
    "env/all/correct",
    "test/env/all/correct",
    "optim/kl_sample_train_v1",
    "kl_policy_base",
    "learning_rate",
    "time/step",
)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file (one JSON object per line)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str | Path, out_path: str | Path, keys: Sequence[str] | None = None) -> Path | None:
    """Draw one panel per key (against ``step``) and save a PNG; returns its path.

    ``keys=None`` draws the :data:`DEFAULT_CURVES` present in the file. Returns None when
    none of the keys has data yet.
    """
    from matplotlib.figure import Figure  # the OO API needs no GUI backend

    rows = read_metrics(metrics_path)
    wanted = keys if keys is not None else DEFAULT_CURVES
    series = {}
    for key in wanted:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            series[key] = points
    if not series:
        return None
    cols = min(3, len(series))
    nrows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * nrows), layout="constrained")
    for i, (key, points) in enumerate(series.items()):
        ax = fig.add_subplot(nrows, cols, i + 1)
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_title(f"{key}: {ys[0]:.4g} → {ys[-1]:.4g}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    out = Path(out_path)
    fig.savefig(out, dpi=100)
    return out
