"""Signal-to-noise ratio over body-masked sub-volumes, after Chest CT-IQA.

Chest CT-IQA (Xun et al., section 3.2.3) defines the SNR of a 3-D series as the ratio of
the mean to the standard deviation of the grey values in small sub-volumes, combined over
the sub-volumes. The paper does not say how the sub-volumes are chosen or pooled; the
choices below are ours (see ``shared/papers/FACTS.md``).

Method (version 1.0.0)
----------------------
1. ROIs are cubes of about ``roi_mm`` (10 mm) on a side: ``round(roi_mm / pixel
   spacing)`` pixels in-plane and ``round(roi_mm / slice spacing)`` slices (at least one),
   tiling the volume without overlap.
2. An ROI is used only if every voxel lies in soft tissue inside the body: the body mask
   (:mod:`qgate.score.scorers.body`) and ``soft_tissue_hu`` (-300..300 HU) on a 2 x 2 block
   mean for slices of 384 pixels and more. Lung, bone, air and the table are left out.
3. ROI SNR = (mean HU + 1000) / standard deviation (n - 1) of HU over the ROI.
4. The series SNR is the median over ROIs (robust to the ROIs that straddle a fat/muscle
   border); a slice's SNR is the median over the ROIs of the slab that holds it.

Why HU + 1000
-------------
The paper divides a mean grey value by its spread. In HU, soft tissue sits near 0 (water
0, muscle ~40, fat ~-100), so mean/std would be near zero, change sign between fat and
muscle, and say nothing about noise. HU + 1000 equals 1000 * mu / mu_water: proportional
to the linear attenuation coefficient, zero for air and about 1000 for water, on every
scanner. It is the physical signal the HU scale offsets away, and is close to the raw
stored values (HU + 1024 with the usual rescale intercept) the paper most likely used.
For soft tissue, SNR ~ 1040 / sigma: 104 at 10 HU of noise, 26 at 40 HU.

The standard deviation of an ROI is noise plus any anatomy inside it, so SNR falls
both with noise and with texture; the median pooling keeps the texture part small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qgate.score.scorers.base import ScoreOutput, SeriesVolume, register_scorer
from qgate.score.scorers.body import block_all, block_mean, block_view, body_mask, mask_scale


@dataclass(frozen=True)
class SnrConfig:
    """Settings of the ``snr`` scorer.

    Parameters
    ----------
    roi_mm : float
        Edge of the cubic ROI in mm (in-plane and through-plane).
    soft_tissue_hu : tuple of float
        Every voxel of an ROI (after a 2 x 2 mean) must lie in this open interval.
    signal_offset_hu : float
        Added to the mean HU to form the signal (1000: proportional to attenuation).
    min_roi_px : int
        Smallest in-plane ROI edge in pixels.
    """

    roi_mm: float = 10.0
    soft_tissue_hu: tuple[float, float] = (-300.0, 300.0)
    signal_offset_hu: float = 1000.0
    min_roi_px: int = 4

    def __post_init__(self) -> None:
        if self.roi_mm <= 0:
            raise ValueError(f"roi_mm must be > 0, got {self.roi_mm}")
        if not self.soft_tissue_hu[0] < self.soft_tissue_hu[1]:
            raise ValueError(f"soft_tissue_hu must be (low, high), got {self.soft_tissue_hu}")
        if self.min_roi_px < 2:
            raise ValueError(f"min_roi_px must be >= 2, got {self.min_roi_px}")


def _slice_spacing(volume: SeriesVolume) -> float | None:
    pos = np.asarray(volume.slice_positions, dtype=np.float64)
    if pos.size > 1:
        steps = np.abs(np.diff(pos))
        steps = steps[steps > 1e-3]
        if steps.size:
            return float(np.median(steps))
    return volume.slice_thickness if volume.slice_thickness else None


@register_scorer("snr")
class SnrScorer:
    """Median ROI SNR, (mean HU + 1000) / std HU, over soft-tissue sub-volumes."""

    name = "snr"
    version = "1.0.0"

    def __init__(self, config: SnrConfig | None = None) -> None:
        self.config = config or SnrConfig()

    def roi_shape(self, volume: SeriesVolume) -> tuple[int, int]:
        """(slices, pixels) of the ROI cube for this series."""
        cfg = self.config
        f = mask_scale(volume.hu.shape)
        spacing = float(np.mean(volume.pixel_spacing)) or 1.0
        px = max(cfg.min_roi_px, round(cfg.roi_mm / spacing))
        px = max(f, px - px % f)
        px = min(px, *volume.hu.shape[1:])
        dz = _slice_spacing(volume)
        depth = 1 if dz is None else max(1, round(cfg.roi_mm / dz))
        return min(depth, volume.n_slices), px

    def score(self, volume: SeriesVolume) -> ScoreOutput:
        cfg = self.config
        lo, hi = cfg.soft_tissue_hu
        depth, px = self.roi_shape(volume)
        f = mask_scale(volume.hu.shape)
        per_slice = np.full(volume.n_slices, np.nan)
        all_snr = []
        for z0 in range(0, volume.n_slices, depth):
            x = np.asarray(volume.hu[z0 : z0 + depth], dtype=np.float32)
            small = block_mean(x, f)
            soft = body_mask(small) & (small > lo) & (small < hi)
            ok = block_all(np.logical_and.reduce(soft, axis=0, keepdims=True), px // f)[0]

            xb = block_view(x, px)  # (d, nr, px, nc, px)
            ok = ok[: xb.shape[1], : xb.shape[3]]
            if not ok.any():
                continue
            mean = xb.mean(axis=(0, 2, 4), dtype=np.float64)
            dev = xb - mean.astype(np.float32)[None, :, None, :, None]
            ss = np.square(dev).sum(axis=(0, 2, 4), dtype=np.float64)
            sd = np.sqrt(ss[ok] / (len(x) * px * px - 1))
            snr = (mean[ok] + cfg.signal_offset_hu) / np.maximum(sd, 1e-6)
            all_snr.append(snr)
            per_slice[z0 : z0 + len(x)] = np.median(snr)

        snr_all = np.concatenate(all_snr) if all_snr else np.empty(0)
        series: dict[str, float | int | str] = {"snr_roi_count": int(snr_all.size)}
        if snr_all.size:
            series["snr"] = round(float(np.median(snr_all)), 3)
        return ScoreOutput(
            series=series,
            slices={"snr": [round(float(v), 3) for v in per_slice]},
            units={"snr": "1", "snr_roi_count": "1"},
        )
