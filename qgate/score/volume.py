"""Load a CT series from DICOM files into a :class:`~qgate.score.scorers.base.SeriesVolume`.

:func:`load_series` turns the instances of one series into an HU volume sorted along the
slice normal; :func:`find_series` groups a folder of DICOM files by series for the
offline ``qgate score PATH``.

Supported: CT Image Storage (one frame per instance), Enhanced CT and Legacy Converted
Enhanced CT Image Storage (multi-frame, geometry and rescale from the shared and
per-frame functional groups), in any transfer syntax pydicom can decode with the
pylibjpeg plugins installed (JPEG baseline and lossless, JPEG-LS, JPEG 2000, RLE,
deflate).

The loader reads every file twice: first the headers only, to choose the series, the
image size and the slice order and to allocate the float32 volume once; then each
instance's pixel data, decoded straight into its slices. Peak memory is the volume plus
one decoded instance.

An instance that cannot be used is skipped with a reason, never with an exception. The
reasons name the problem only (sizes, modality, SOP class, decoder error type), never
patient data.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

from qgate.score.scorers.base import SeriesVolume

log = logging.getLogger(__name__)

#: The SOP classes that are loaded as CT volumes.
CT_STORAGE_CLASSES = frozenset(
    {CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)

#: Largest volume load_series allocates by default (4 GiB of float32).
MAX_VOXELS = 1 << 30

_SAME_NORMAL = 0.999  # |cos| between slice normals that counts as the same orientation


class SeriesLoadError(Exception):
    """No usable CT slice remained; ``skipped`` says why for each instance."""

    def __init__(self, message: str, skipped: list[tuple[Path, str]] | None = None) -> None:
        super().__init__(message)
        self.skipped = list(skipped or [])

    def __reduce__(self) -> tuple[type[SeriesLoadError], tuple[str, list[tuple[Path, str]]]]:
        # Raised in a decoder process (qgate.score.prefetch), it crosses back with its reasons.
        return (type(self), (str(self), self.skipped))


@dataclass
class LoadedSeries:
    """A loaded series: the volume, the instances left out, and the headers used.

    ``headers`` holds one dataset per instance that contributed slices (pixel data not
    loaded), in slice order of each instance's first frame, for the report stage.
    ``skipped`` holds ``(path, reason)`` for every instance left out.
    """

    volume: SeriesVolume
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    headers: list[Dataset] = field(default_factory=list)


@dataclass
class _Frame:
    instance: int  # index into the instance list
    number: int  # 1-based frame number
    position: np.ndarray | None  # ImagePositionPatient
    orientation: np.ndarray | None  # ImageOrientationPatient (6)
    spacing: tuple[float, float] | None
    thickness: float | None
    slope: float
    intercept: float
    slice_location: float | None


@dataclass
class _Instance:
    path: Path
    header: Dataset
    rows: int
    cols: int
    frames: list[_Frame]
    instance_number: int | None
    order: int  # position in the input list


# --------------------------------------------------------------------------- reading


def _read(path: Path, *, stop_before_pixels: bool, specific_tags: list[str] | None = None):
    """dcmread a Part 10 file; fall back to a raw dataset (no preamble) if it has a UID."""
    try:
        return pydicom.dcmread(
            path, stop_before_pixels=stop_before_pixels, specific_tags=specific_tags
        )
    except InvalidDicomError:
        ds = pydicom.dcmread(
            path, stop_before_pixels=stop_before_pixels, specific_tags=specific_tags, force=True
        )
        if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:
            raise
        return ds


def find_series(root: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Group the DICOM files under ``root`` (a folder, walked recursively, or one file).

    Only headers are read. Files that are not DICOM, or have no SeriesInstanceUID
    (DICOMDIR, for one), are ignored. Returns ``{series_instance_uid: [paths]}`` with
    paths sorted, series in the order their first file was found.
    """
    root = Path(root)
    if root.is_file():
        candidates: Iterable[Path] = [root]
    else:
        candidates = sorted(p for p in root.rglob("*") if p.is_file())
    found: dict[str, list[Path]] = {}
    for path in candidates:
        try:
            ds = _read(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            uid = str(ds.SeriesInstanceUID).strip()
        except Exception:  # not DICOM, unreadable, no series: not ours to score
            continue
        if uid:
            found.setdefault(uid, []).append(path)
    return found


# ------------------------------------------------------------------------ geometry


def _item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _fg_value(fgs: Sequence[Dataset | None], macro: str, keyword: str) -> Any:
    """``keyword`` from functional-group ``macro`` (e.g. PlanePositionSequence)."""
    for fg in fgs:
        if fg is None:
            continue
        item = _item(fg, macro)
        if item is not None and keyword in item:
            value = item.get(keyword)
            if value is not None and value != "":
                return value
    return None


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _float(value: Any, default: float | None = None) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _spacing(value: Any) -> tuple[float, float] | None:
    arr = _floats(value, 2)
    if arr is None or np.any(arr <= 0):
        return None
    return float(arr[0]), float(arr[1])


def _frames(ds: Dataset, index: int) -> list[_Frame]:
    """The frames of one instance with their geometry and rescale."""
    n_frames = int(ds.get("NumberOfFrames") or 1)
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    frames = []
    for k in range(n_frames):
        pf = per_frame[k] if k < len(per_frame) else None
        fgs = (pf, shared)
        ipp = _fg_value(fgs, "PlanePositionSequence", "ImagePositionPatient")
        iop = _fg_value(fgs, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _fg_value(fgs, "PixelMeasuresSequence", "PixelSpacing")
        thick = _fg_value(fgs, "PixelMeasuresSequence", "SliceThickness")
        slope = _fg_value(fgs, "PixelValueTransformationSequence", "RescaleSlope")
        icpt = _fg_value(fgs, "PixelValueTransformationSequence", "RescaleIntercept")
        frames.append(
            _Frame(
                instance=index,
                number=k + 1,
                position=_floats(ipp if ipp is not None else ds.get("ImagePositionPatient"), 3),
                orientation=_floats(
                    iop if iop is not None else ds.get("ImageOrientationPatient"), 6
                ),
                spacing=_spacing(spacing if spacing is not None else ds.get("PixelSpacing")),
                thickness=_float(thick if thick is not None else ds.get("SliceThickness")),
                slope=_float(slope if slope is not None else ds.get("RescaleSlope"), 1.0) or 1.0,
                intercept=_float(icpt if icpt is not None else ds.get("RescaleIntercept"), 0.0)
                or 0.0,
                slice_location=_float(ds.get("SliceLocation")) if n_frames == 1 else None,
            )
        )
    return frames


def _normal(orientation: np.ndarray) -> np.ndarray | None:
    n = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 1e-6 else None


def _check_instance(ds: Dataset) -> str | None:
    """Why this header cannot be a CT slice source, or None if it can."""
    sop_class = str(
        ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "")
    )
    modality = str(ds.get("Modality") or "").strip()
    if modality and modality != "CT":
        return f"modality {modality!r} is not CT"
    if sop_class not in CT_STORAGE_CLASSES:
        name = UID(sop_class).name if sop_class else "missing"
        return f"SOP class {name!r} is not CT or Enhanced CT Image Storage"
    if not modality:
        return "no Modality"
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        return "no image size (Rows/Columns)"
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        return "not a greyscale image (SamplesPerPixel != 1)"
    if not str(ds.get("SeriesInstanceUID") or "").strip():
        return "no SeriesInstanceUID"
    return None


# -------------------------------------------------------------------------- loading


#: Makes the float32 volume of ``load_series``: given its shape, an uninitialised array
#: (page-locked memory for a GPU, shared memory for another process).
Allocator = Callable[[tuple[int, int, int]], np.ndarray]


def empty_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """The default :data:`Allocator`: ``np.empty`` of float32."""
    return np.empty(shape, dtype=np.float32)


def load_series(
    paths: Sequence[str | os.PathLike[str]],
    *,
    max_voxels: int = MAX_VOXELS,
    allocate: Allocator = empty_volume,
) -> LoadedSeries:
    """Load the CT instances in ``paths`` as one HU volume.

    Parameters
    ----------
    paths : sequence of path-like
        The instance files of one series (a file of another series is skipped).
    max_voxels : int, optional
        Refuse (``SeriesLoadError``) to allocate a larger volume.
    allocate : callable, optional
        Makes the volume (C-contiguous float32 of the given shape); default ``np.empty``.
        With instances left out, ``volume.hu`` is the leading part of what it returned.

    Returns
    -------
    LoadedSeries
        The volume (float32 HU = stored * slope + intercept, slices sorted by position
        along the slice normal, ascending), the skipped instances with reasons and the
        headers of the instances used.

    Raises
    ------
    SeriesLoadError
        If no usable slice remains (its ``skipped`` lists every reason).

    Notes
    -----
    Slice order is ``dot(ImagePositionPatient, row x column direction)``, with the
    normal of the series' main orientation. If any frame lacks position or orientation,
    the order falls back to InstanceNumber (then frame number, then input order) and the
    positions to SliceLocation when every slice has one, else to index * slice thickness
    (1 mm if unknown). Instances are skipped when they are unreadable, not CT, of another
    series, a duplicate SOP Instance UID, of a different size or orientation than the
    majority, without pixel data, or when their pixel data fails to decode.
    """
    skipped: list[tuple[Path, str]] = []
    instances = _read_headers([Path(p) for p in paths], skipped)
    instances, normal = _select_majority(instances, skipped)
    if not instances:
        raise SeriesLoadError("no usable CT instance in the series", skipped)

    frames = [f for inst in instances for f in inst.frames]
    order, positions = _sort_frames(instances, frames, normal)
    rows, cols = instances[0].rows, instances[0].cols
    n_voxels = len(frames) * rows * cols
    if n_voxels > max_voxels:
        raise SeriesLoadError(
            f"series too large: {len(frames)} x {rows} x {cols} voxels > {max_voxels}", skipped
        )

    hu = allocate((len(frames), rows, cols))
    if hu.shape != (len(frames), rows, cols) or hu.dtype != np.float32:
        raise TypeError(f"allocate returned {hu.dtype} {hu.shape}, not float32 of that shape")
    slot_of = {id(frames[i]): s for s, i in enumerate(order)}
    valid = np.zeros(len(frames), dtype=bool)
    first_slot = {}
    for k, inst in enumerate(instances):
        slots = [slot_of[id(f)] for f in inst.frames]
        reason = _decode_into(inst, hu, slots)
        if reason is not None:
            log.debug("skipping %s: %s", inst.path.name, reason)
            skipped.append((inst.path, reason))
            continue
        valid[slots] = True
        first_slot[k] = min(slots)

    if not valid.any():
        raise SeriesLoadError("no CT slice could be decoded", skipped)
    if not valid.all():  # compact in place: no second copy of the volume
        keep = np.flatnonzero(valid)
        for dst, src in enumerate(keep):
            if dst != src:
                hu[dst] = hu[src]
        hu = hu[: len(keep)]
    else:
        keep = np.arange(len(frames))

    sorted_frames = [frames[order[s]] for s in keep]
    used = sorted(first_slot, key=first_slot.__getitem__)
    headers = [instances[k].header for k in used]
    volume = SeriesVolume(
        hu=hu,
        pixel_spacing=_majority([f.spacing for f in sorted_frames]) or (1.0, 1.0),
        slice_thickness=_majority([f.thickness for f in sorted_frames]),
        slice_positions=tuple(float(positions[s]) for s in keep),
        sop_instance_uids=tuple(
            str(instances[f.instance].header.SOPInstanceUID) for f in sorted_frames
        ),
        frame_numbers=tuple(f.number for f in sorted_frames),
        series_instance_uid=str(headers[0].SeriesInstanceUID),
        study_instance_uid=str(headers[0].get("StudyInstanceUID") or ""),
        sop_class_uid=str(headers[0].SOPClassUID),
        acquisition=_acquisition(headers[0]),
    )
    return LoadedSeries(volume=volume, skipped=skipped, headers=headers)


def _read_headers(paths: list[Path], skipped: list[tuple[Path, str]]) -> list[_Instance]:
    instances: list[_Instance] = []
    for order, path in enumerate(paths):
        try:
            ds = _read(path, stop_before_pixels=True)
        except Exception as exc:
            skipped.append((path, f"not a readable DICOM file ({type(exc).__name__})"))
            continue
        try:
            reason = _check_instance(ds)
            if reason is None:
                frames = _frames(ds, len(instances))
                inst_no = _float(ds.get("InstanceNumber"))
                instances.append(
                    _Instance(
                        path=path,
                        header=ds,
                        rows=int(ds.Rows),
                        cols=int(ds.Columns),
                        frames=frames,
                        instance_number=None if inst_no is None else int(inst_no),
                        order=order,
                    )
                )
        except Exception as exc:  # a malformed header element
            reason = f"invalid header ({type(exc).__name__})"
        if reason is not None:
            skipped.append((path, reason))
    return instances


def _majority(values: Iterable[Any]) -> Any:
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def _select_majority(
    instances: list[_Instance], skipped: list[tuple[Path, str]]
) -> tuple[list[_Instance], np.ndarray | None]:
    """Keep one series, one image size, one orientation, one copy of each instance.

    Returns the kept instances and the unit slice normal of the majority orientation
    (None when no frame has an orientation).
    """
    if not instances:
        return [], None
    series = Counter(str(i.header.SeriesInstanceUID) for i in instances).most_common(1)[0][0]
    size = Counter()
    for inst in instances:
        if str(inst.header.SeriesInstanceUID) == series:
            size[(inst.rows, inst.cols)] += len(inst.frames)
    (rows, cols), _ = size.most_common(1)[0]
    normals = Counter()
    for inst in instances:
        for f in inst.frames:
            n = None if f.orientation is None else _normal(f.orientation)
            if n is not None:
                normals[tuple(np.round(n, 3))] += 1
    ref = np.asarray(normals.most_common(1)[0][0]) if normals else None

    kept: list[_Instance] = []
    seen: set[str] = set()
    for inst in instances:
        reason = None
        sop_uid = str(inst.header.get("SOPInstanceUID") or "")
        if str(inst.header.SeriesInstanceUID) != series:
            reason = "belongs to another series"
        elif (inst.rows, inst.cols) != (rows, cols):
            reason = (
                f"image size {inst.rows}x{inst.cols} differs from the series majority {rows}x{cols}"
            )
        elif not sop_uid:
            reason = "no SOPInstanceUID"
        elif sop_uid in seen:
            reason = "duplicate SOP Instance UID"
        elif ref is not None and any(
            f.orientation is not None
            and (n := _normal(f.orientation)) is not None
            and abs(float(n @ ref)) < _SAME_NORMAL
            for f in inst.frames
        ):
            reason = "slice orientation differs from the series majority"
        if reason is not None:
            skipped.append((inst.path, reason))
            continue
        seen.add(sop_uid)
        kept.append(inst)
    for k, inst in enumerate(kept):  # re-index frames to the kept list
        for f in inst.frames:
            f.instance = k
    return kept, ref


def _sort_frames(
    instances: list[_Instance], frames: list[_Frame], ref: np.ndarray | None
) -> tuple[list[int], np.ndarray]:
    """Frame indices in slice order, and each slot's position along ``ref`` (mm)."""
    if ref is not None and all(f.position is not None for f in frames):
        pos = np.array([float(f.position @ ref) for f in frames])
        keys = [
            (pos[i], instances[f.instance].instance_number or 0, f.number, i)
            for i, f in enumerate(frames)
        ]
        order = [k[-1] for k in sorted(keys)]
        return order, pos[order]

    big = 1 << 62
    keys2 = [
        (
            instances[f.instance].instance_number
            if instances[f.instance].instance_number is not None
            else big,
            instances[f.instance].order,
            f.number,
            i,
        )
        for i, f in enumerate(frames)
    ]
    order = [k[-1] for k in sorted(keys2)]
    locs = [frames[i].slice_location for i in order]
    if all(v is not None for v in locs):
        return order, np.asarray(locs, dtype=np.float64)
    step = _majority(f.thickness for f in frames) or 1.0
    return order, np.arange(len(order), dtype=np.float64) * step


def _decode_into(inst: _Instance, hu: np.ndarray, slots: list[int]) -> str | None:
    """Decode ``inst`` into ``hu[slots]`` (in frame order); return a skip reason on failure."""
    try:
        ds = _read(inst.path, stop_before_pixels=False)
    except Exception as exc:
        return f"not a readable DICOM file ({type(exc).__name__})"
    if "PixelData" not in ds:
        return "no pixel data"
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax_name = UID(str(syntax)).name if syntax else "unknown transfer syntax"
    try:
        arr = ds.pixel_array
    except Exception as exc:
        msg = " ".join(str(exc).split())[:160]
        return f"pixel data could not be decoded ({syntax_name}): {type(exc).__name__}: {msg}"
    expected = (len(slots), inst.rows, inst.cols)
    if arr.shape != expected:
        arr = arr.reshape(expected) if arr.size == np.prod(expected) else arr
    if arr.shape != expected:
        return f"decoded pixel data has shape {arr.shape}, expected {expected}"
    for frame, slot, plane in zip(inst.frames, slots, arr, strict=True):
        out = hu[slot]
        out[...] = plane
        if frame.slope != 1.0:
            out *= np.float32(frame.slope)
        if frame.intercept != 0.0:
            out += np.float32(frame.intercept)
    return None


def _acquisition(ds: Dataset) -> dict[str, Any]:
    """PHI-free acquisition hints for scorers (kVp, mA, mAs, CTDIvol, kernel, window)."""
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    fgs = (shared, per_frame[0] if per_frame else None)

    def pick(keyword: str, macro: str | None) -> Any:
        value = ds.get(keyword)
        if (value is None or value == "") and macro is not None:
            value = _fg_value(fgs, macro, keyword)
        return value

    out: dict[str, Any] = {}
    for key, keyword, macro in (
        ("kvp", "KVP", "CTXRayDetailsSequence"),
        ("tube_current_ma", "XRayTubeCurrent", None),
        ("tube_current_ma", "XRayTubeCurrentInmA", "CTExposureSequence"),
        ("exposure_mas", "Exposure", None),
        ("exposure_mas", "ExposureInmAs", "CTExposureSequence"),
        ("ctdivol_mgy", "CTDIvol", "CTExposureSequence"),
        ("window_center", "WindowCenter", "FrameVOILUTSequence"),
        ("window_width", "WindowWidth", "FrameVOILUTSequence"),
    ):
        if key in out:
            continue
        value = pick(keyword, macro)
        if isinstance(value, pydicom.multival.MultiValue):
            value = value[0] if len(value) else None
        number = _float(value)
        if number is not None:
            out[key] = number
    for key, keyword, macro in (
        ("convolution_kernel", "ConvolutionKernel", "CTReconstructionSequence"),
        ("manufacturer", "Manufacturer", None),
        ("model", "ManufacturerModelName", None),
        ("body_part", "BodyPartExamined", None),
    ):
        value = pick(keyword, macro)
        if isinstance(value, pydicom.multival.MultiValue):
            value = "\\".join(str(v) for v in value)
        if value not in (None, ""):
            out[key] = str(value)
    return out
