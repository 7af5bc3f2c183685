"""``qgate-train simulate``: a DICOM CT series -> the same series acquired at lower dose.

The input is taken as a full-dose scan: the extra noise of the lower dose is added in the
projection domain (:meth:`LowDoseSimulator.reduce_dose`), with every k-th view kept, and
the slices are reconstructed with the chosen kernel. The output keeps the geometry of
every instance (position, orientation, spacing, size, frame of reference, study) with new
SOP Instance UIDs, a new Series Instance UID, ImageType DERIVED\\SECONDARY, a source
image reference to the instance it came from, and dose fields scaled by dose / k.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from training.anatomy.base import square_pad
from training.anatomy.dicom_folder import DicomSeries, read_dicom_series
from training.ct import LowDoseSimulator, ScanParams

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


def simulate_series(
    series: DicomSeries,
    *,
    dose: float,
    views_step: int = 1,
    kernel: str = "standard",
    seed: int = 0,
    device: str | None = None,
    batch: int = 4,
    progress: Progress | None = None,
) -> np.ndarray:
    """Low-dose HU slices (Z, rows, cols) for ``series``."""
    row_mm, col_mm = series.pixel_spacing
    if abs(row_mm - col_mm) > 1e-3:
        raise ValueError(f"non-square pixels {series.pixel_spacing} are not supported")
    z, h, w = series.hu.shape
    vol = square_pad(series.hu)
    n = vol.shape[-1]
    sim = LowDoseSimulator(ScanParams.for_pixel_size(col_mm, kernel=kernel), device=device)
    gen = sim.generator(seed)
    out = np.empty((z, h, w), np.float32)
    top, left = (n - h) // 2, (n - w) // 2
    for i in range(0, z, batch):
        hu = torch.tensor(vol[i : i + batch])
        line = sim.project(hu, col_mm)
        low = sim.reconstruct(sim.reduce_dose(line, dose, gen), col_mm, n, views_step=views_step)
        out[i : i + batch] = low.cpu().numpy()[:, top : top + h, left : left + w]
        if progress:
            progress(hu.shape[0])
    # Pixels outside the scanner's reconstruction circle (stored below -1024, e.g. -2048)
    # keep their padding value: they were never measured.
    pad = series.hu < -1024.0
    out[pad] = series.hu[pad]
    return out


def _store(ds: Dataset, hu: np.ndarray) -> np.ndarray:
    """HU -> stored values with the instance's own rescale and pixel representation."""
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    bits = int(getattr(ds, "BitsStored", 16))
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    raw = np.clip(np.round((hu - intercept) / slope), lo, hi)
    return raw.astype(np.int16 if signed else np.uint16)


def derived_datasets(
    series: DicomSeries,
    low_hu: np.ndarray,
    *,
    dose: float,
    views_step: int,
    kernel: str,
    seed: int,
) -> list[Dataset]:
    """New instances: same geometry and study, new UIDs, DERIVED, scaled dose fields."""
    series_uid = generate_uid()
    now = dt.datetime.now()
    note = f"qgate simulated dose {dose:.0%}, views 1/{views_step}, kernel {kernel}, seed {seed}"
    out = []
    for src, hu in zip(series.datasets, low_hu, strict=True):
        ds = copy.deepcopy(src)  # Dataset.copy() shares elements: edits would leak back
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID = series_uid
        itype = list(getattr(src, "ImageType", ["ORIGINAL", "PRIMARY", "AXIAL"]))
        ds.ImageType = (
            ["DERIVED", "SECONDARY", *itype[2:]] if len(itype) > 2 else ["DERIVED", "SECONDARY"]
        )
        ds.SeriesNumber = int(getattr(src, "SeriesNumber", 0) or 0) + 1000
        ds.SeriesDescription = f"{getattr(src, 'SeriesDescription', '')} [{note}]".strip()[:64]
        ds.DerivationDescription = note[:1024]
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        ds.SourceImageSequence = [ref]
        ds.ContentDate = now.strftime("%Y%m%d")
        ds.ContentTime = now.strftime("%H%M%S")
        ds.ConvolutionKernel = f"qgate-{kernel}"[:16]
        factor = dose / views_step  # fewer views, fewer exposures
        for key in ("Exposure", "XRayTubeCurrent", "ExposureInuAs", "CTDIvol"):
            if key in ds and ds[key].value not in (None, ""):
                val = float(ds[key].value) * factor
                ds[key].value = round(val) if ds[key].VR == "IS" else val
        for key in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if key in ds:
                del ds[key]
        stored = _store(ds, hu)
        ds.BitsAllocated = 16
        ds.PixelData = stored.tobytes()
        if "NumberOfFrames" in ds:
            del ds["NumberOfFrames"]
        out.append(ds)
    return out


def simulate_folder(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    dose: float,
    views_step: int = 1,
    kernel: str = "standard",
    seed: int = 0,
    device: str | None = None,
    progress_factory: Callable[[int, str], Progress] | None = None,
) -> list[Path]:
    """Simulate every CT series under ``input_dir`` into ``output_dir``.

    One series goes straight into ``output_dir``; several go into one folder each, named
    by their new Series Instance UID. Returns the files written.
    """
    all_series = read_dicom_series(input_dir)
    if not all_series:
        raise FileNotFoundError(f"no single-frame CT series under {input_dir}")
    out_root = Path(output_dir)
    written: list[Path] = []
    for s in all_series:
        prog = progress_factory(s.hu.shape[0], s.series_uid) if progress_factory else None
        low = simulate_series(
            s,
            dose=dose,
            views_step=views_step,
            kernel=kernel,
            seed=seed,
            device=device,
            progress=prog,
        )
        dss = derived_datasets(s, low, dose=dose, views_step=views_step, kernel=kernel, seed=seed)
        folder = out_root if len(all_series) == 1 else out_root / dss[0].SeriesInstanceUID
        folder.mkdir(parents=True, exist_ok=True)
        for i, ds in enumerate(dss):
            p = folder / f"{i:04d}.dcm"
            ds.save_as(p, enforce_file_format=True)
            written.append(p)
    return written
