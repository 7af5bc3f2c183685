"""Synthetic CT series for demos, tests and benchmarks.

A simple elliptical chest phantom (soft tissue, fat, lungs, spine) with white noise of a
chosen sigma, written as standard CT Image Storage instances. Real anatomy and a physical
low-dose model live in ``training/``; this is only a well-formed, known-noise input.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


def phantom_slice(rows: int, cols: int, z: float = 0.0) -> np.ndarray:
    """A noiseless chest-like slice in HU; ``z`` in [0, 1] varies it along the series."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    img = np.full((rows, cols), -1000.0, np.float32)

    def ellipse(y0: float, x0: float, ry: float, rx: float) -> np.ndarray:
        return ((yy - y0) / ry) ** 2 + ((xx - x0) / rx) ** 2 <= 1.0

    img[ellipse(cy, cx, 0.36 * rows, 0.45 * cols)] = -100.0  # fat
    img[ellipse(cy, cx, 0.33 * rows, 0.42 * cols)] = 40.0  # soft tissue
    lung_r = (0.20 + 0.04 * np.sin(np.pi * z)) * rows
    img[ellipse(cy - 0.02 * rows, cx - 0.2 * cols, lung_r, 0.14 * cols)] = -850.0
    img[ellipse(cy - 0.02 * rows, cx + 0.2 * cols, lung_r, 0.14 * cols)] = -850.0
    img[ellipse(cy + 0.24 * rows, cx, 0.05 * rows, 0.05 * cols)] = 700.0  # vertebra
    img[ellipse(cy - 0.05 * rows, cx + 0.02 * cols, 0.06 * rows, 0.05 * cols)] = 60.0  # heart
    return img


def make_ct_series(
    n_slices: int = 8,
    rows: int = 256,
    cols: int = 256,
    noise_hu: float = 15.0,
    *,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    pixel_spacing: float = 0.8,
    slice_thickness: float = 2.5,
    patient_id: str = "QGATE-TEST-0001",
    patient_name: str = "Test^Phantom",
    modality: str = "CT",
) -> list[Dataset]:
    """Build ``n_slices`` CT instances of one series, with noise of ``noise_hu`` sigma."""
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    now = dt.datetime.now()
    out = []
    for i in range(n_slices):
        hu = phantom_slice(rows, cols, i / max(n_slices - 1, 1))
        hu = hu + rng.normal(0.0, noise_hu, hu.shape).astype(np.float32)
        stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.uint16)

        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "QG0001"
        ds.Modality = modality
        ds.Manufacturer = "qgate synthetic"
        ds.BodyPartExamined = "CHEST"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic chest phantom"
        ds.SeriesDescription = f"Phantom noise {noise_hu:g} HU"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [
            -cols * pixel_spacing / 2,
            -rows * pixel_spacing / 2,
            -i * slice_thickness,
        ]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = -i * slice_thickness
        ds.SliceThickness = slice_thickness
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.KVP = 120
        ds.ConvolutionKernel = "STANDARD"
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = stored.tobytes()
        out.append(ds)
    return out


def write_series(datasets: list[Dataset], folder: str | Path) -> list[Path]:
    """Write datasets as ``folder/NNNN.dcm`` (DICOM Part 10 files) and return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = folder / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
