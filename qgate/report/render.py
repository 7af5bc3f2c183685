"""Rendering of quality-map slices: windowed CT, colour overlay, colour bar, burned-in text.

Everything here is array-at-a-time (numpy, scipy.ndimage, Pillow); no per-pixel Python.
:class:`SliceRenderer` draws the parts shared by every slice of a series (the side panel
with decision, reasons, series outputs and colour bar) once, and per slice only blends the
overlay and writes the slice's own values.

Layout of one rendered image (height ``H``, at least ``min_size`` pixels)::

    +---------------------------+-------------------------+
    | slice 12/240  z -30.0 mm  | QUALITY CONTROL ...     |
    |                           | [ FLAGGED FOR REVIEW ]  |
    |   CT slice (grayscale)    | reasons                 |
    |   + translucent map       | series outputs          |
    |     inside the body       | colour bar + ticks/unit |
    | W 400  L 40               | this slice's values     |
    +---------------------------+-------------------------+
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

# --- colour maps ---------------------------------------------------------------------

# Anchor colours, low -> high, interpolated linearly to 256 entries (as matplotlib's
# LinearSegmentedColormap.from_list does), so no plotting library is needed.
_ANCHORS: dict[str, str] = {
    # ColorBrewer RdYlGn: red (bad) -> yellow -> green (good). The default, because a
    # traffic-light reading needs no legend; the colour bar also labels both ends.
    "quality": "a50026 d73027 f46d43 fdae61 fee08b ffffbf d9ef8b a6d96a 66bd63 1a9850 006837",
    # Perceptually uniform and colour-blind safe (matplotlib's viridis, 9 samples).
    "viridis": "440154 472c7a 3b518b 2c718e 21908d 27ad81 5cc863 aadc32 fde725",
}


def colormap_lut(name: str) -> np.ndarray:
    """A (256, 3) uint8 lookup table for colour map ``name``.

    Raises
    ------
    ValueError
        When ``name`` is not a known colour map.
    """
    try:
        anchors = _ANCHORS[name].split()
    except KeyError:
        raise ValueError(f"unknown colour map {name!r}; known: {', '.join(_ANCHORS)}") from None
    rgb = np.array([[int(a[i : i + 2], 16) for i in (0, 2, 4)] for a in anchors], np.float64)
    x = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(t, x, rgb[:, c]) for c in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


def colormap_names() -> list[str]:
    return sorted(_ANCHORS)


# --- array helpers -------------------------------------------------------------------


def window_gray(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Window HU values to uint8 grey levels (linear, DICOM-style centre/width)."""
    if width <= 0:
        raise ValueError("window width must be positive")
    lo = center - width / 2.0
    g = (hu.astype(np.float32) - lo) * (255.0 / width)
    return np.clip(g, 0, 255).astype(np.uint8)


def body_mask(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """The patient's body in one slice: the largest connected region above ``threshold``
    HU, with holes (lungs, bowel gas) filled. Removes the table and air noise."""
    mask = hu > threshold
    mask = ndimage.binary_opening(mask, iterations=2)
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def resize_map(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D float map to ``shape`` (rows, cols), bilinear; NaN stays NaN."""
    if values.shape == shape:
        return values.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0).astype(np.float32)
    size = (shape[1], shape[0])  # PIL: (width, height)
    out = np.asarray(Image.fromarray(filled, mode="F").resize(size, Image.BILINEAR))
    if not finite.all():
        ok = Image.fromarray(finite.astype(np.uint8) * 255).resize(size, Image.NEAREST)
        out = np.where(np.asarray(ok) > 0, out, np.nan)
    return out.astype(np.float32, copy=False)


def normalise(values: np.ndarray, lo: float, hi: float, higher_is_better: bool) -> np.ndarray:
    """Map values to [0, 1] where 1 is *good*, clipped to the display range."""
    t = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return t if higher_is_better else 1.0 - t


def overlay(
    gray: np.ndarray, goodness: np.ndarray, mask: np.ndarray, lut: np.ndarray, alpha: float
) -> np.ndarray:
    """Blend ``lut[goodness]`` over the grey image where ``mask``; returns (H, W, 3) uint8."""
    rgb = np.repeat(gray[..., None], 3, axis=2)
    valid = mask & np.isfinite(goodness)
    idx = np.round(np.nan_to_num(goodness[valid]) * 255).astype(np.intp)
    base = rgb[valid].astype(np.float32)
    rgb[valid] = np.round(base * (1 - alpha) + lut[idx].astype(np.float32) * alpha).astype(np.uint8)
    return rgb


def format_value(value: float | int | str, unit: str = "") -> str:
    """Compact display of an output value with its unit (unit "1" is not shown)."""
    if isinstance(value, str):
        return value
    v = float(value)
    if not np.isfinite(v):
        text = "n/a"
    elif v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-2):
        text = f"{v:.2e}"
    elif float(v).is_integer() and abs(v) < 1e4:
        text = f"{int(v)}"
    else:
        text = f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    unit = "" if unit in ("", "1") else unit
    return f"{text} {unit}".rstrip()


# --- drawing -------------------------------------------------------------------------

_BG = (16, 18, 22)
_FG = (235, 235, 235)
_DIM = (160, 165, 175)
_PASS = (26, 152, 80)
_FLAG = (215, 48, 39)


# DejaVu Sans covers Latin, Greek and the maths signs reasons may use (sigma, >=); it is
# in Debian's fonts-dejavu-core. Pillow's built-in font (Latin only) is the fallback.
_FONT_FILES = {
    False: ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf"),
    True: ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "DejaVuSans-Bold.ttf"),
}


@functools.lru_cache(maxsize=32)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in _FONT_FILES[bold]:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class MapLegend:
    """What the colour bar shows: the map's name, unit, display range and direction."""

    title: str
    unit: str
    display_range: tuple[float, float]
    higher_is_better: bool


@dataclass(frozen=True)
class TableSection:
    """A heading and (label, value) rows, drawn as a two-column table."""

    heading: str
    rows: tuple[tuple[str, str], ...]


class SliceRenderer:
    """Render the quality-map images of one series.

    Parameters
    ----------
    shape: tuple[int, int]
        (rows, columns) of the CT slices.
    window: tuple[float, float]
        Grey-scale window (centre, width) in HU.
    decision: str
        ``"pass"`` or ``"flag"``.
    reasons: Sequence[str]
        Reasons for the decision, shown under it.
    series: Sequence[TableSection]
        Series outputs, one section per scorer.
    legend: Union[MapLegend, None]
        Colour bar description; ``None`` when there is no map (no overlay, no bar).
    colormap: str, optional
        Colour map name (see :func:`colormap_names`).
    alpha: float, optional
        Opacity of the overlay inside the body, 0 < alpha <= 1.
    min_size: int, optional
        Minimum height of the image area in pixels; small slices are upscaled so text
        stays legible.
    """

    def __init__(
        self,
        *,
        shape: tuple[int, int],
        window: tuple[float, float],
        decision: str,
        reasons: Sequence[str],
        series: Sequence[TableSection],
        legend: MapLegend | None,
        colormap: str = "quality",
        alpha: float = 0.45,
        min_size: int = 512,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        if decision not in ("pass", "flag"):
            raise ValueError(f"decision must be 'pass' or 'flag', got {decision!r}")
        if window[1] <= 0:
            raise ValueError("window width must be positive")
        self.shape = shape
        self.window = window
        self.legend = legend
        self.alpha = alpha
        self.lut = colormap_lut(colormap)
        rows, cols = shape
        self.scale = max(1.0, min_size / rows)
        self.image_size = (round(cols * self.scale), round(rows * self.scale))  # (w, h)
        u = self.image_size[1] / 512.0  # layout unit: sizes below are for 512 px
        self.u = u
        self.fs = max(11, round(15 * u))
        self.fs_small = max(10, round(13 * u))
        self.fs_big = max(14, round(24 * u))
        self.font = _font(self.fs)
        self.font_small = _font(self.fs_small)
        self.font_big = _font(self.fs_big, bold=True)
        self.pad = round(10 * u)
        self.line_h = round(self.fs * 1.3)
        self.panel_w = round(420 * u)
        self.bar_col_w = round(92 * u) if legend is not None else 0
        self.text_w = self.panel_w - self.bar_col_w - 2 * self.pad
        self._panel, self._slice_top = self._draw_panel(decision, reasons, series)

    # -- public ------------------------------------------------------------------------

    @property
    def pixel_scale(self) -> float:
        """Factor from CT pixels to rendered pixels (divide the pixel spacing by it)."""
        return self.scale

    def render(
        self,
        hu: np.ndarray,
        values: np.ndarray | None,
        *,
        header: str,
        slice_rows: Sequence[tuple[str, str]],
    ) -> np.ndarray:
        """Render one slice.

        Parameters
        ----------
        hu: numpy.ndarray
            (rows, cols) slice in HU.
        values: Union[numpy.ndarray, None]
            The map for this slice at any resolution (resized here), or ``None``.
        header: str
            Line drawn at the top left of the image (slice number and position).
        slice_rows: Sequence[tuple[str, str]]
            This slice's (label, value) pairs, drawn in the panel.

        Returns
        -------
        numpy.ndarray
            (H, W, 3) uint8 RGB image.
        """
        if hu.shape != self.shape:
            raise ValueError(f"slice shape {hu.shape} != renderer shape {self.shape}")
        gray = window_gray(hu, *self.window)
        if values is not None and self.legend is not None:
            lo, hi = self.legend.display_range
            m = resize_map(np.asarray(values, np.float32), self.shape)
            rgb = overlay(
                gray,
                normalise(m, lo, hi, self.legend.higher_is_better),
                body_mask(hu),
                self.lut,
                self.alpha,
            )
        else:
            rgb = np.repeat(gray[..., None], 3, axis=2)
        img = Image.fromarray(rgb, mode="RGB")
        if img.size != self.image_size:
            img = img.resize(self.image_size, Image.BILINEAR)
        canvas = Image.new("RGB", (self.image_size[0] + self.panel_w, self.image_size[1]), _BG)
        canvas.paste(img, (0, 0))
        canvas.paste(self._panel, (self.image_size[0], 0))
        d = ImageDraw.Draw(canvas)
        outline = {"stroke_width": max(1, round(1.5 * self.u)), "stroke_fill": (0, 0, 0)}
        d.text((self.pad, self.pad), header, font=self.font, fill=_FG, **outline)
        c, w = self.window
        d.text(
            (self.pad, self.image_size[1] - self.pad - self.fs_small),
            f"W {w:g}  L {c:g}",
            font=self.font_small,
            fill=_FG,
            **outline,
        )
        x0 = self.image_size[0] + self.pad
        bottom = self.image_size[1] - self.pad
        self._table(d, x0, self._slice_top, slice_rows, self.font, bottom)
        return np.asarray(canvas)

    # -- panel -------------------------------------------------------------------------

    def _wrap(self, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
        lines: list[str] = []
        cur = ""
        for word in text.split():
            trial = f"{cur} {word}".strip()
            if cur and font.getlength(trial) > width:
                lines.append(cur)
                cur = word
            else:
                cur = trial
        if cur:
            lines.append(cur)
        return lines

    def _fit(self, text: str, font: ImageFont.ImageFont, width: float) -> str:
        """``text`` shortened with an ellipsis to fit ``width`` pixels."""
        if font.getlength(text) <= width:
            return text
        while text and font.getlength(text + "...") > width:
            text = text[:-1]
        return text.rstrip() + "..."

    def _table(
        self,
        d: ImageDraw.ImageDraw,
        x: int,
        y: int,
        rows: Sequence[tuple[str, str]],
        font: ImageFont.ImageFont,
        bottom: int,
    ) -> int:
        """Label left, value right-aligned at the text column's edge; returns the new y."""
        size = font.size  # type: ignore[attr-defined]
        step = round(size * 1.3)
        right = x + self.text_w
        for label, value in rows:
            if y + size > bottom:
                break
            vw = font.getlength(value)
            d.text((right - vw, y), value, font=font, fill=_FG)
            d.text(
                (x, y), self._fit(label, font, self.text_w - vw - self.pad), font=font, fill=_DIM
            )
            y += step
        return y

    def _draw_panel(
        self, decision: str, reasons: Sequence[str], series: Sequence[TableSection]
    ) -> tuple[Image.Image, int]:
        h = self.image_size[1]
        pw, pad = self.panel_w, self.pad
        panel = Image.new("RGB", (pw, h), _BG)
        d = ImageDraw.Draw(panel)
        small_h = round(self.fs_small * 1.3)
        y = pad

        d.text((pad, y), "QUALITY CONTROL - NOT FOR DIAGNOSIS", font=self.font_small, fill=_DIM)
        y += small_h + pad // 2
        colour = _PASS if decision == "pass" else _FLAG
        label = "PASS" if decision == "pass" else "FLAGGED FOR REVIEW"
        box_h = round(self.fs_big * 1.6)
        d.rectangle((pad, y, pw - pad, y + box_h), fill=colour)
        tw = self.font_big.getlength(label)
        d.text(
            ((pw - tw) / 2, y + (box_h - self.fs_big) / 2 - 1),
            label,
            font=self.font_big,
            fill=(255, 255, 255),
        )
        y += box_h + pad
        columns_top = y

        if self.legend is not None:
            self._draw_colour_bar(panel, d, pw - self.bar_col_w, columns_top, h - pad)

        # Text column: reasons, per-scorer series outputs; the slice table follows.
        reserve = 4 * self.line_h + pad  # keep room for "This slice" and three rows
        limit = h - reserve
        # Reasons first: whole reasons while they fit in six lines, so the values below
        # always fit; the SR carries all of them.
        budget = 6
        for k, reason in enumerate(reasons):
            lines = self._wrap(reason, self.font_small, self.text_w - pad)
            left = len(reasons) - k - 1
            room = budget - (1 if left else 0)
            if len(lines) > room:
                if k > 0 or room < 1:
                    more = len(reasons) - k
                    d.text(
                        (2 * pad, y), f"... {more} more in the SR", font=self.font_small, fill=_DIM
                    )
                    y += small_h
                    break
                lines = [
                    *lines[: room - 1],
                    self._fit(" ".join(lines[room - 1 :]), self.font_small, self.text_w - pad),
                ]
            d.text((pad, y), "-", font=self.font_small, fill=_FG)
            for part in lines:
                d.text((2 * pad, y), part, font=self.font_small, fill=_FG)
                y += small_h
            budget -= len(lines)
        y += pad
        for section in series:
            if y + 2 * self.line_h > limit:
                break
            d.text((pad, y), section.heading, font=self.font, fill=_FG)
            y += self.line_h
            y = self._table(d, pad, y, section.rows, self.font_small, limit)
            y += pad // 2
        if self.legend is None:
            d.text((pad, y), "No quality map from the scorers", font=self.font_small, fill=_DIM)
            y += small_h
        y += pad // 2
        d.line((pad, y, pad + self.text_w, y), fill=(70, 74, 82), width=1)
        y += pad // 2
        d.text((pad, y), "This slice", font=self.font, fill=_FG)
        y += self.line_h
        return panel, y

    def _draw_colour_bar(
        self, panel: Image.Image, d: ImageDraw.ImageDraw, x0: int, top: int, bottom: int
    ) -> None:
        """Vertical bar in the panel's right column: title, unit, ticks, better/worse."""
        assert self.legend is not None
        lg = self.legend
        lo, hi = lg.display_range
        fs = self.fs_small
        hi_word, lo_word = ("better", "worse") if lg.higher_is_better else ("worse", "better")
        # Title (map name) and direction words above and below the bar.
        y = top
        width = self.bar_col_w - self.pad
        title = self._wrap(lg.title, self.font_small, width)
        if len(title) > 2:
            title = [title[0], self._fit(" ".join(title[1:]), self.font_small, width)]
        for part in title:
            d.text((x0, y), part, font=self.font_small, fill=_DIM)
            y += round(fs * 1.2)
        d.text((x0, y), hi_word, font=self.font_small, fill=_FG)
        bar_top = y + round(fs * 2.0)
        bar_bottom = bottom - round(fs * 1.6)
        d.text((x0, bar_bottom + round(fs * 0.5)), lo_word, font=self.font_small, fill=_FG)
        n = bar_bottom - bar_top
        if n < 20:
            return
        bar_w = round(20 * self.u)
        vals = np.linspace(hi, lo, n, dtype=np.float32)  # top of the bar = high end
        col = self.lut[np.round(normalise(vals, lo, hi, lg.higher_is_better) * 255).astype(np.intp)]
        panel.paste(Image.fromarray(np.repeat(col[:, None, :], bar_w, axis=1)), (x0, bar_top))
        d.rectangle((x0 - 1, bar_top - 1, x0 + bar_w, bar_bottom), outline=_DIM)
        tick = round(5 * self.u)
        for v in np.linspace(hi, lo, 5):
            yy = bar_top + (hi - v) / (hi - lo) * (n - 1)
            d.line((x0 + bar_w, yy, x0 + bar_w + tick, yy), fill=_FG, width=1)
            d.text(
                (x0 + bar_w + tick + 3, yy - fs / 2 - 1),
                format_value(float(v), lg.unit),
                font=self.font_small,
                fill=_FG,
            )
