"""Small PNG charts for training and evaluation, drawn with Pillow (no plotting dependency).

:func:`line_chart` (loss curves, ladders), :func:`scatter_chart` (predicted vs true) and
:func:`bar_chart` (ablations). Each writes one PNG and returns its path. Charts are
deliberately plain: axes with ticks, a legend, a title; small files for the repository.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["bar_chart", "line_chart", "scatter_chart"]

W, H = 640, 440
MARGIN = (70, 40, 20, 60)  # left, top, right, bottom
COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
)

Series = tuple[Sequence[float], Sequence[float]]


def _font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + 1e-9 * step:
        out.append(round(v, 10))
        v += step
    return out


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis spanning 10**lo .. 10**hi: decades, else 1-2-5, else 1..9."""
    for mults in ((1,), (1, 2, 5), tuple(range(1, 10))):
        t = [
            m * 10.0**e
            for e in range(math.floor(lo), math.ceil(hi) + 1)
            for m in mults
            if lo <= math.log10(m * 10.0**e) <= hi
        ]
        if len(t) >= 2:
            return t
    return _ticks(10**lo, 10**hi)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.1e}"
    return f"{v:.3g}"


class _Axes:
    def __init__(
        self,
        xlim: tuple[float, float],
        ylim: tuple[float, float],
        *,
        log_y: bool = False,
    ) -> None:
        self.img = Image.new("RGB", (W, H), (255, 255, 255))
        self.draw = ImageDraw.Draw(self.img)
        self.font = _font()
        self.log_y = log_y
        self.x0, self.x1 = xlim
        y0, y1 = ylim
        if log_y:
            y0, y1 = math.log10(max(y0, 1e-12)), math.log10(max(y1, 1e-12))
        pad = 0.05 * (y1 - y0 or 1.0)
        self.y0, self.y1 = y0 - pad, y1 + pad
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1.0
        left, top, right, bottom = MARGIN
        self.box = (left, top, W - right, H - bottom)

    def px(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        if self.log_y:
            y = math.log10(max(y, 1e-12))
        u = left + (x - self.x0) / (self.x1 - self.x0) * (right - left)
        v = bottom - (y - self.y0) / (self.y1 - self.y0) * (bottom - top)
        return u, v

    def frame(self, title: str, xlabel: str, ylabel: str, xticks: bool = True) -> None:
        left, top, right, bottom = self.box
        d, f = self.draw, self.font
        d.rectangle(self.box, outline=(0, 0, 0))
        if xticks:
            for t in _ticks(self.x0, self.x1):
                u, _ = self.px(t, self.y0 if not self.log_y else 10**self.y0)
                d.line([(u, bottom), (u, bottom + 4)], fill=(0, 0, 0))
                d.text((u, bottom + 6), _fmt(t), fill=(0, 0, 0), font=f, anchor="ma")
        yt = _log_ticks(self.y0, self.y1) if self.log_y else _ticks(self.y0, self.y1)
        for t in yt:
            _, v = self.px(self.x0, t)
            if top <= v <= bottom:
                d.line([(left - 4, v), (left, v)], fill=(0, 0, 0))
                d.line([(left, v), (right, v)], fill=(235, 235, 235))
                d.text((left - 6, v), _fmt(t), fill=(0, 0, 0), font=f, anchor="rm")
        d.rectangle(self.box, outline=(0, 0, 0))
        d.text((W / 2, 12), title, fill=(0, 0, 0), font=_font(15), anchor="ma")
        d.text(((left + right) / 2, H - 18), xlabel, fill=(0, 0, 0), font=f, anchor="ma")
        d.text((8, top - 22), ylabel, fill=(0, 0, 0), font=f)

    def legend(self, names: Sequence[str]) -> None:
        _, top, right, _ = self.box
        width = max((self.draw.textlength(n, font=self.font) for n in names), default=0)
        x = right - width - 34
        for i, name in enumerate(names):
            y = top + 8 + 16 * i
            c = COLOURS[i % len(COLOURS)]
            self.draw.rectangle([x, y, x + 12, y + 10], fill=c)
            self.draw.text((x + 18, y - 2), name, fill=(0, 0, 0), font=self.font)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.img.save(p, optimize=True)
        return p


def _limits(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def line_chart(
    series: Mapping[str, Series],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    markers: bool = False,
    xtick_labels: Sequence[str] | None = None,
) -> Path:
    """One line per named series of (x, y). ``xtick_labels`` labels x = 0, 1, 2, ..."""
    xs = [float(x) for s in series.values() for x in s[0]]
    ys = [float(y) for s in series.values() for y in s[1]]
    if log_y:
        ys = [y for y in ys if y > 0] or [1.0]
    ax = _Axes(_limits(xs), _limits(ys), log_y=log_y)
    if xtick_labels is not None:
        ax.x0, ax.x1 = -0.3, len(xtick_labels) - 0.7
    ax.frame(title, xlabel, ylabel, xticks=xtick_labels is None)
    if xtick_labels is not None:
        bottom = ax.box[3]
        for i, lab in enumerate(xtick_labels):
            u, _ = ax.px(i, 10**ax.y0 if log_y else ax.y0)
            ax.draw.text((u, bottom + 6), lab, fill=(0, 0, 0), font=ax.font, anchor="ma")
    for i, (_, (x, y)) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        pts = [
            ax.px(float(a), float(b))
            for a, b in zip(x, y, strict=True)
            if math.isfinite(float(b)) and (not log_y or float(b) > 0)
        ]
        if len(pts) > 1:
            ax.draw.line(pts, fill=c, width=2)
        if markers or len(pts) == 1:
            for u, v in pts:
                ax.draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=c)
    ax.legend(list(series))
    return ax.save(path)


def scatter_chart(
    groups: Mapping[str, Series],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    identity: bool = True,
) -> Path:
    """Points (x, y) per named group; ``identity`` draws y = x (predicted vs true)."""
    xs = [float(x) for g in groups.values() for x in g[0]]
    ys = [float(y) for g in groups.values() for y in g[1]]
    lo, hi = _limits(xs + ys) if identity else (0.0, 0.0)
    ax = _Axes((lo, hi) if identity else _limits(xs), (lo, hi) if identity else _limits(ys))
    ax.frame(title, xlabel, ylabel)
    if identity:
        ax.draw.line([ax.px(lo, lo), ax.px(hi, hi)], fill=(150, 150, 150), width=1)
    for i, (_, (x, y)) in enumerate(groups.items()):
        c = COLOURS[i % len(COLOURS)]
        for a, b in zip(x, y, strict=True):
            if math.isfinite(float(a)) and math.isfinite(float(b)):
                u, v = ax.px(float(a), float(b))
                ax.draw.ellipse([u - 2.5, v - 2.5, u + 2.5, v + 2.5], outline=c)
    if len(groups) > 1:
        ax.legend(list(groups))
    return ax.save(path)


def bar_chart(
    values: Mapping[str, float],
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    baseline: float | None = 0.0,
) -> Path:
    """One bar per named value (e.g. an ablation's Overall)."""
    v = [float(x) for x in values.values()]
    lo, hi = _limits([*v, baseline] if baseline is not None else v)
    ax = _Axes((-0.6, len(v) - 0.4), (lo, hi))
    ax.frame(title, "", ylabel, xticks=False)
    base = baseline if baseline is not None else ax.y0
    for i, (name, val) in enumerate(values.items()):
        c = COLOURS[i % len(COLOURS)]
        u0, v0 = ax.px(i - 0.3, base)
        u1, v1 = ax.px(i + 0.3, val if math.isfinite(val) else base)
        ax.draw.rectangle([u0, min(v0, v1), u1, max(v0, v1)], fill=c)
        ax.draw.text(
            ((u0 + u1) / 2, min(v0, v1) - 4),
            f"{val:.3f}",
            fill=(0, 0, 0),
            font=ax.font,
            anchor="md",
        )
        ax.draw.text(
            ((u0 + u1) / 2, ax.box[3] + 6), name, fill=(0, 0, 0), font=ax.font, anchor="ma"
        )
    return ax.save(path)
