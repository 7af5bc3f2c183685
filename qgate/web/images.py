"""The quality-map images of a result, as PNG for the browser.

The worker writes one RGB Secondary Capture per scored slice next to the result's SR
(``Result.sr_path``'s folder, ``sc00000.dcm`` ...; see :mod:`qgate.report.write`). Those files
are what the archive receives, so the review app shows exactly them: decoded with pydicom,
encoded as PNG with Pillow on request, and kept in a small in-memory LRU cache. A result's
folder never changes once written, so the PNGs can be cached by the browser too.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from qgate.core.storage import to_local
from qgate.report.sc import select_slices

THUMB_HEIGHT = 112
# Width of the burned-in side panel for an image of ``rows`` rows: qgate.report.render lays
# the panel out at 420 px per 512 px of height. Thumbnails crop it off.
_PANEL_PER_ROW = 420 / 512


class MapImageError(LookupError):
    """The map image does not exist or cannot be decoded."""


def map_files(sr_path: str | None, storage_root: Path) -> list[Path]:
    """The quality-map files of a result, in slice order; [] when there are none.

    ``sr_path`` is stored relative to ``storage_root`` (:mod:`qgate.core.storage`) and must lie
    under its ``outgoing/`` (a guard against a stray path in SQL).
    """
    if not sr_path:
        return []
    folder = to_local(sr_path, storage_root).parent
    outgoing_dir = storage_root / "outgoing"
    try:
        folder.resolve().relative_to(outgoing_dir.resolve())
    except ValueError:
        return []
    return sorted(folder.glob("sc*.dcm"))


def slice_indices(n_slices: int, n_maps: int) -> list[int]:
    """Which scored slice each map image shows (all slices, or an even spread)."""
    if n_maps >= n_slices:
        return list(range(n_maps))
    return select_slices(n_slices, n_maps)


def thumbnail_picks(n_maps: int, most: int = 48) -> list[int]:
    """Map indices to show as thumbnails: all, or ``most`` spread evenly (ends kept)."""
    return select_slices(n_maps, most) if n_maps > most else list(range(n_maps))


def map_size(files: Sequence[Path]) -> tuple[int, int]:
    """(width, height) of the first map image, from its header; a default when unreadable."""
    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows)
    except (IndexError, OSError, AttributeError, pydicom.errors.InvalidDicomError):
        return (932, 512)


def _to_png(pixels: np.ndarray, *, thumb: bool) -> bytes:
    if pixels.ndim == 2:
        img = Image.fromarray(pixels).convert("RGB")
    else:
        img = Image.fromarray(np.ascontiguousarray(pixels[..., :3]), mode="RGB")
    if thumb:
        rows, cols = pixels.shape[:2]
        image_w = cols - round(_PANEL_PER_ROW * rows)
        if 0 < image_w < cols:
            img = img.crop((0, 0, image_w, rows))
        scale = THUMB_HEIGHT / img.height
        img = img.resize((max(1, round(img.width * scale)), THUMB_HEIGHT), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class MapImages:
    """Decode-and-encode with an LRU cache of at most ``budget_bytes`` of PNG."""

    def __init__(self, budget_bytes: int = 64 * 1024 * 1024) -> None:
        self.budget = budget_bytes
        self._cache: OrderedDict[tuple[str, int, bool], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def png(self, files: Sequence[Path], index: int, *, thumb: bool = False) -> bytes:
        """PNG of map ``index`` of ``files`` (full size, or a cropped thumbnail).

        Raises
        ------
        MapImageError
            When there is no such image or it cannot be decoded.
        """
        if not 0 <= index < len(files):
            raise MapImageError(f"no map image {index} (this result has {len(files)})")
        path = files[index]
        try:
            key = (str(path), path.stat().st_mtime_ns, thumb)
        except OSError as exc:
            raise MapImageError(f"map image {index} is gone: {exc}") from exc
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            pixels = pydicom.dcmread(path).pixel_array
        except Exception as exc:  # any decode failure is "cannot show this image"
            raise MapImageError(f"map image {index} cannot be decoded: {exc}") from exc
        data = _to_png(pixels, thumb=thumb)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = data
                self._size += len(data)
            while self._size > self.budget and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._size -= len(old)
        return data
