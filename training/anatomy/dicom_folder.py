"""Any folder of the user's own CT DICOM series, as anatomy and as input to ``simulate``."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from training.anatomy.base import AnatomyVolume, square_pad

log = logging.getLogger(__name__)

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class DicomSeries:
    """One single-frame CT series: its instances sorted along the slice normal, and HU."""

    datasets: list[Dataset]
    hu: np.ndarray  # (Z, rows, cols) float32
    pixel_spacing: tuple[float, float]
    slice_mm: float

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def patient_id(self) -> str:
        return str(getattr(self.datasets[0], "PatientID", "") or self.series_uid)

    def to_volume(self) -> AnatomyVolume:
        """As anatomy: square-padded with air, patient = DICOM PatientID."""
        row_mm, col_mm = self.pixel_spacing
        if abs(row_mm - col_mm) > 1e-3:
            raise ValueError(f"series {self.series_uid}: non-square pixels {self.pixel_spacing}")
        body = str(getattr(self.datasets[0], "BodyPartExamined", "")).lower()
        region = "chest" if "chest" in body else "abdomen" if "abd" in body else "unknown"
        return AnatomyVolume(
            hu=square_pad(self.hu),
            pixel_mm=float(col_mm),
            slice_mm=self.slice_mm,
            patient_id=f"dicom-{self.patient_id}",
            source="dicom",
            region=region,  # type: ignore[arg-type]
            noiseless=False,
            meta={"series_uid": self.series_uid, "n_instances": len(self.datasets)},
        )


def _hu(ds: Dataset) -> np.ndarray:
    arr = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return arr * slope + intercept


def _normal(ds: Dataset) -> np.ndarray:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


def read_dicom_series(folder: str | Path, *, with_pixels: bool = True) -> list[DicomSeries]:
    """All single-frame CT series under ``folder`` (recursively), sorted along the normal.

    Files that are not DICOM, not CT, multi-frame, or lack geometry are skipped (logged).
    """
    groups: dict[str, list[Dataset]] = defaultdict(list)
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not with_pixels)
        except Exception:  # not DICOM: skip quietly, folders hold other files too
            continue
        if str(getattr(ds, "SOPClassUID", "")) != CT_STORAGE and ds.get("Modality") != "CT":
            continue
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            log.warning("skipping multi-frame instance %s", path)
            continue
        if not all(hasattr(ds, k) for k in ("ImagePositionPatient", "ImageOrientationPatient")):
            log.warning("skipping %s: no image position/orientation", path)
            continue
        ds.filename = str(path)
        groups[str(ds.SeriesInstanceUID)].append(ds)

    out = []
    for uid, dss in groups.items():
        normal = _normal(dss[0])
        pos = np.array([np.dot(normal, [float(v) for v in d.ImagePositionPatient]) for d in dss])
        order = np.argsort(pos)
        dss = [dss[i] for i in order]
        pos = pos[order]
        shapes = {(int(d.Rows), int(d.Columns)) for d in dss}
        if len(shapes) != 1:
            log.warning("skipping series %s: mixed image sizes %s", uid, shapes)
            continue
        if len(pos) > 1:
            slice_mm = float(np.median(np.diff(pos)))
        else:
            slice_mm = float(getattr(dss[0], "SliceThickness", 1.0) or 1.0)
        hu = np.stack([_hu(d) for d in dss]) if with_pixels else np.zeros((0, 0, 0), np.float32)
        spacing = tuple(float(v) for v in dss[0].PixelSpacing)
        out.append(DicomSeries(dss, hu, (spacing[0], spacing[1]), abs(slice_mm)))
    return out


def load_dicom_volumes(folder: str | Path) -> list[AnatomyVolume]:
    """Every CT series under ``folder`` as anatomy (one :class:`AnatomyVolume` each)."""
    vols = []
    for s in read_dicom_series(folder):
        try:
            vols.append(s.to_volume())
        except ValueError as e:
            log.warning("skipping series: %s", e)
    return vols
