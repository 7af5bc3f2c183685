"""Per-slice strip plots as inline SVG geometry (the template draws it; no JS library).

One bar per slice, from the axis to the slice's value; a slice outside a gate limit is
drawn in the alarm colour, the limits as dashed lines. The page's script moves a cursor
to the slice on screen and jumps to a slice when its bar is clicked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from qgate.config import Threshold
from qgate.report.render import format_value

WIDTH = 900
HEIGHT = 130
LEFT = 52  # room for the y tick labels
RIGHT = 8
TOP = 8
BOTTOM = 22  # room for the x tick labels


@dataclass(frozen=True)
class Bar:
    index: int
    x: float
    y: float
    height: float
    value: str
    bad: bool


@dataclass(frozen=True)
class Tick:
    pos: float
    label: str


@dataclass(frozen=True)
class Limit:
    y: float
    label: str


@dataclass(frozen=True)
class StripPlot:
    scorer: str
    output: str
    title: str
    unit: str
    bars: tuple[Bar, ...]
    missing: tuple[int, ...]  # slices with no value
    bar_width: float
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    limits: tuple[Limit, ...]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    plot_bottom: float = HEIGHT - BOTTOM

    @property
    def step(self) -> float:
        n = len(self.bars) + len(self.missing)
        return (self.width - self.left - RIGHT) / max(n, 1)


def _nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    v = first
    while v <= hi + 1e-9 * span:
        ticks.append(round(v, 10))
        v += step
    return ticks


def strip_plot(
    scorer: str,
    output: str,
    values: Sequence[float | None],
    *,
    title: str,
    unit: str,
    thresholds: Sequence[Threshold] = (),
) -> StripPlot | None:
    """Geometry of one plot; None when no slice has a finite value."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    limits = [x for t in thresholds for x in (t.min, t.max) if x is not None]
    lo = min(0.0, *finite, *limits)
    hi = max(*finite, *limits) if limits else max(finite)
    if hi <= lo:
        hi = lo + 1.0
    hi += (hi - lo) * 0.08
    plot_h = HEIGHT - BOTTOM - TOP
    n = len(values)
    step = (WIDTH - LEFT - RIGHT) / max(n, 1)
    bar_w = max(step * 0.8, 0.5) if n > 1 else min(step * 0.5, 40)

    def y_of(v: float) -> float:
        return TOP + (hi - v) / (hi - lo) * plot_h

    base = y_of(max(lo, 0.0))
    bars, missing = [], []
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            missing.append(i)
            continue
        y = y_of(v)
        bad = any(
            (t.min is not None and v < t.min) or (t.max is not None and v > t.max)
            for t in thresholds
        )
        top, h = (y, base - y) if y <= base else (base, y - base)
        bars.append(
            Bar(
                index=i,
                x=LEFT + i * step + (step - bar_w) / 2,
                y=round(top, 2),
                height=round(max(h, 0.8), 2),
                value=format_value(v, unit),
                bad=bad,
            )
        )
    y_ticks = tuple(Tick(round(y_of(t), 2), format_value(t)) for t in _nice_ticks(lo, hi))
    picks = sorted({0, n - 1, *(round(k * (n - 1) / 4) for k in range(1, 4))}) if n > 1 else [0]
    x_ticks = tuple(Tick(round(LEFT + (i + 0.5) * step, 2), str(i + 1)) for i in picks)
    limit_lines = tuple(
        Limit(round(y_of(x), 2), f"{'min' if x == t.min else 'max'} {format_value(x, unit)}")
        for t in thresholds
        for x in (t.min, t.max)
        if x is not None
    )
    return StripPlot(
        scorer=scorer,
        output=output,
        title=title,
        unit=unit,
        bars=tuple(bars),
        missing=tuple(missing),
        bar_width=round(bar_w, 2),
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        limits=limit_lines,
    )
