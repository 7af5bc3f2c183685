"""Classical image-quality measures, run on the same held-out data as the models.

* robust noise sigma in HU (``qgate.score.scorers.noise``, the service's own scorer);
* ROI SNR, (mean HU + 1000) / std (``qgate.score.scorers.snr``);
* BRISQUE (the ``brisque`` package, offline; :func:`qgate.core.physics.brisque_label`).

Each works on HU arrays with a pixel size, wrapping them in a :class:`SeriesVolume` the
way the service would see a series.
"""

from __future__ import annotations

import math

import numpy as np

from qgate.score.scorers.base import SeriesVolume

__all__ = [
    "apply_thresholds",
    "brisque_score",
    "class_medians",
    "noise_sigma",
    "series_volume",
    "snr_classic",
]


def series_volume(hu: np.ndarray, pixel_mm: float, slice_mm: float = 2.5) -> SeriesVolume:
    """A synthetic :class:`SeriesVolume` around HU slices (S, H, W) or one slice (H, W)."""
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim == 2:
        hu = hu[None]
    n = hu.shape[0]
    return SeriesVolume(
        hu=hu,
        pixel_spacing=(float(pixel_mm), float(pixel_mm)),
        slice_thickness=float(slice_mm),
        slice_positions=tuple(float(i * slice_mm) for i in range(n)),
        sop_instance_uids=tuple(f"1.2.826.0.1.3680043.10.1.{i + 1}" for i in range(n)),
        frame_numbers=(1,) * n,
        series_instance_uid="1.2.826.0.1.3680043.10.2",
        study_instance_uid="1.2.826.0.1.3680043.10.3",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


def noise_sigma(hu: np.ndarray, pixel_mm: float) -> float:
    """Series noise sigma (HU) of the service's ``noise`` scorer; NaN if not measurable."""
    from qgate.score.scorers.noise import NoiseScorer

    out = NoiseScorer().score(series_volume(hu, pixel_mm))
    return float(out.series.get("noise_sigma_hu", math.nan))


def snr_classic(hu: np.ndarray, pixel_mm: float, slice_mm: float = 2.5) -> float:
    """Series SNR of the service's ``snr`` scorer; NaN if no ROI fits."""
    from qgate.score.scorers.snr import SnrScorer

    out = SnrScorer().score(series_volume(hu, pixel_mm, slice_mm))
    return float(out.series.get("snr", math.nan))


def brisque_score(gray01: np.ndarray) -> float:
    """BRISQUE of one windowed slice in [0, 1] (lower is better); NaN if it fails."""
    from qgate.core.physics import brisque_label

    try:
        return float(brisque_label(np.asarray(gray01, dtype=np.float32)))
    except Exception:  # the package raises on flat images; a baseline must not stop a report
        return math.nan


def class_medians(
    train_values: np.ndarray, train_labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """Median of one scalar (e.g. log noise sigma) per class on training data: a
    nearest-median classifier with :func:`apply_thresholds`."""
    v = np.asarray(train_values, dtype=float)
    y = np.asarray(train_labels, dtype=int)
    med = np.array(
        [np.nanmedian(v[y == c]) if np.any(y == c) else np.nan for c in range(num_classes)]
    )
    return med


def apply_thresholds(values: np.ndarray, class_medians: np.ndarray) -> np.ndarray:
    """Nearest class median (the classical dose / kernel classifier)."""
    v = np.asarray(values, dtype=float)[:, None]
    med = np.asarray(class_medians, dtype=float)[None]
    d = np.abs(v - med)
    d[np.isnan(d)] = np.inf
    return d.argmin(axis=1)
