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
    wanted = keys if keys is not None else DEFAULT_CURVES
    return plot_panels([(metrics_path, key, "") for key in wanted], out_path)


def plot_panels(panels: Sequence[tuple[str | Path, str, str]], out_path: str | Path) -> Path | None:
    """One panel per ``(metrics_path, key, label)`` with data, in order; returns the PNG's path.

    Panels may come from different runs (e.g. the stages of a pipeline); ``label`` prefixes the
    panel's title. Returns None when no panel has data.
    """
    from matplotlib.figure import Figure  # the OO API needs no GUI backend

    series = panel_series(panels)
    if not series:
        return None
    cols = min(3, len(series))
    nrows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * nrows), layout="constrained")
    for i, (title, points) in enumerate(series):
        ax = fig.add_subplot(nrows, cols, i + 1)
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_title(f"{title}: {ys[0]:.4g} → {ys[-1]:.4g}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    out = Path(out_path)
    fig.savefig(out, dpi=100)
    return out


def panel_series(panels: Sequence[tuple[str | Path, str, str]]) -> list[tuple[str, list[tuple[int, float]]]]:
    """``(title, [(step, value), ...])`` for each panel with data: what :func:`plot_panels` draws."""
    rows_by_path = {str(path): read_metrics(path) for path, _, _ in panels}
    series = []
    for path, key, label in panels:
        points = [(r["step"], r[key]) for r in rows_by_path[str(path)] if isinstance(r.get(key), (int, float))]
        if points:
            series.append((f"{label} {key}".strip(), points))
    return series


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tinker_cookbook.utils.plotting OUT.png [LABEL=]METRICS_JSONL:KEY[,KEY...] ...``"""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("panels", nargs="+", help="[LABEL=]METRICS_JSONL:KEY[,KEY...], one panel per key")
    args = parser.parse_args(argv)
    panels = []
    for spec in args.panels:
        label, eq, rest = spec.partition("=")
        if not eq:
            label, rest = "", spec
        path, sep, keys = rest.rpartition(":")
        if not sep or not keys:
            parser.error(f"panels: expected [LABEL=]METRICS_JSONL:KEY[,KEY...], got {spec!r}")
        panels += [(path, key, label) for key in keys.split(",")]
    if plot_panels(panels, args.out) is None:
        parser.error("panels: none of the keys has data")


if __name__ == "__main__":
    main()
