"""Per-slice strip plots as inline SVG geometry (the template draws it; no JS library).

One bar per slice, from the axis to the slice's value; a slice outside a gate limit is
drawn in the alarm colour, the limits as dashed lines. The page's script moves a cursor
to the slice on screen and jumps to a slice when its bar is clicked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from qgate.core.config import Threshold
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
    def plot_right(self) -> float:
        return self.width - RIGHT

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


# ------------------------------------------------------------------ line charts


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str  # the tooltip
    marked: bool = False  # drawn larger (a promoted run)


@dataclass(frozen=True)
class Line:
    name: str
    css: str  # the class that colours it
    points: tuple[Point, ...]

    @property
    def path(self) -> str:
        """The ``points`` attribute of the SVG polyline."""
        return " ".join(f"{p.x},{p.y}" for p in self.points)


@dataclass(frozen=True)
class LineChart:
    """Geometry of a line chart (the ``line_chart`` macro of ``_macros.html`` draws it)."""

    title: str
    lines: tuple[Line, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    width: int
    height: int
    left: int
    top: int
    plot_bottom: float
    plot_right: float


#: One line's data: (name, css class, [(x, y or None, tooltip, marked), ...]).
LineData = tuple[str, str, Sequence[tuple[float, float | None, str, bool]]]


def line_chart(
    title: str,
    lines: Sequence[LineData],
    *,
    x_labels: Sequence[tuple[float, str]] | None = None,
    width: int = WIDTH,
    height: int = 170,
    left: int = LEFT,
    max_x_ticks: int = 10,
) -> LineChart | None:
    """Lines over a shared x axis (missing or non-finite y values are left out); None when
    nothing is finite. ``x_labels`` names the x ticks (else round numbers along x)."""
    kept = [
        (name, css, [(x, y, t, m) for x, y, t, m in pts if y is not None and math.isfinite(y)])
        for name, css, pts in lines
    ]
    kept = [k for k in kept if k[2]]
    if not kept:
        return None
    xs = [p[0] for _, _, pts in kept for p in pts]
    ys = [p[1] for _, _, pts in kept for p in pts]
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.1 or max(abs(y_hi) * 0.1, 0.1)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_lo, x_hi = min(xs), max(xs)
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    right, plot_bottom = width - RIGHT - 4, height - BOTTOM
    plot_h = plot_bottom - TOP

    def px(x: float) -> float:
        return round(left + 6 + (x - x_lo) / (x_hi - x_lo) * (right - left - 12), 2)

    def py(y: float) -> float:
        return round(TOP + (y_hi - y) / (y_hi - y_lo) * plot_h, 2)

    if x_labels is None:
        x_labels = [(t, format_value(t)) for t in _nice_ticks(x_lo, x_hi, 5) if t >= x_lo]
    elif len(x_labels) > max_x_ticks:
        step = math.ceil(len(x_labels) / max_x_ticks)
        x_labels = [*x_labels[:-1:step], x_labels[-1]]
    return LineChart(
        title=title,
        lines=tuple(
            Line(name, css, tuple(Point(px(x), py(y), t, m) for x, y, t, m in pts))  # type: ignore[arg-type]
            for name, css, pts in kept
        ),
        y_ticks=tuple(Tick(py(t), format_value(t)) for t in _nice_ticks(y_lo, y_hi)),
        x_ticks=tuple(Tick(px(x), label) for x, label in x_labels),
        width=width,
        height=height,
        left=left,
        top=TOP,
        plot_bottom=plot_bottom,
        plot_right=right,
    )
