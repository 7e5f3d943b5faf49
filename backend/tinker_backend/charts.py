"""Server-rendered SVG line charts for the console: no plotting library, no script in the page.

A chart is a polyline over the points that have a value, with the y range and the step range
written on its axes. The ``<svg>`` carries ``data-points`` (how many points it draws) so that
a browser test can watch a curve grow.
"""

from __future__ import annotations

import html
import math

WIDTH, HEIGHT = 640, 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 24, 28  # margins for the axis labels


def line_chart(title: str, xs: list[float], ys: list[float | None]) -> str:
    """An SVG chart of ``ys`` over ``xs``; points whose y is None or not finite are left out."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    label = html.escape(title)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="{label}" '
        f'data-points="{len(points)}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">'
        f'<text x="{_LEFT}" y="16" class="chart-title">{label}</text>'
    )
    if not points:
        return head + f'<text x="{_LEFT}" y="{HEIGHT // 2}" class="chart-empty">no data yet</text></svg>'
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:  # a flat line: give it a visible band around its value
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    inner_w, inner_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def sx(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * inner_w

    def sy(y: float) -> float:
        return _TOP + (1 - (y - y0) / (y1 - y0)) * inner_h

    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    bottom = HEIGHT - _BOTTOM
    axes = (
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{bottom}" class="chart-axis"/>'
        f'<line x1="{_LEFT}" y1="{bottom}" x2="{WIDTH - _RIGHT}" y2="{bottom}" class="chart-axis"/>'
        f'<text x="{_LEFT - 6}" y="{_TOP + 4}" text-anchor="end" class="chart-tick">{_fmt(y1)}</text>'
        f'<text x="{_LEFT - 6}" y="{bottom}" text-anchor="end" class="chart-tick">{_fmt(y0)}</text>'
        f'<text x="{_LEFT}" y="{HEIGHT - 8}" class="chart-tick">step {_fmt(x0)}</text>'
        f'<text x="{WIDTH - _RIGHT}" y="{HEIGHT - 8}" text-anchor="end" class="chart-tick">step {_fmt(x1)}</text>'
    )
    last = points[-1]
    marker = f'<circle cx="{sx(last[0]):.1f}" cy="{sy(last[1]):.1f}" r="3" class="chart-last"/>'
    return head + axes + f'<polyline points="{coords}" class="chart-line"/>' + marker + "</svg>"


def _fmt(value: float) -> str:
    """A short label: integers as such, other values with 4 significant digits."""
    if value == int(value) and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"
