"""The quality-map series: one RGB Secondary Capture image per scored slice.

Each image shows the CT slice windowed in grey, the selected scorer map as a translucent
colour overlay inside the body, a colour bar with ticks and unit, and the gate decision,
reasons, series outputs and the slice's own values burned in (see
:mod:`qgate.report.render` for the layout). The series is new and lives in the study of
the scored series; every image references the CT instance it was rendered from.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as std_codes
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless, generate_uid

from qgate.report import codes
from qgate.report.content import QualityReport, check_positive_int, check_uid
from qgate.report.render import (
    MapLegend,
    SliceRenderer,
    TableSection,
    colormap_names,
    format_value,
)

_SUPPORTED_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, RLELossless)
_DEFAULT_WINDOW = (40.0, 400.0)  # soft tissue, HU


def select_slices(n_slices: int, max_images: int | None) -> list[int]:
    """Indices of the slices to render: all, or ``max_images`` evenly spread (ends kept)."""
    if max_images is None or max_images >= n_slices:
        return list(range(n_slices))
    return sorted({int(i) for i in np.round(np.linspace(0, n_slices - 1, max_images))})


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation (row, column direction letters) from Image Orientation (Patient).

    Uses the dominant axis of each direction cosine; falls back to axial ``("L", "P")``
    when the dataset has no orientation.
    """
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        try:
            shared = ds.SharedFunctionalGroupsSequence[0]
            iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError):
            return ("L", "P")
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # -x/+x, -y/+y, -z/+z

    def letter(cosines: Sequence[float]) -> str:
        axis = int(np.argmax(np.abs(cosines)))
        return letters[axis][int(cosines[axis] > 0)]

    v = [float(x) for x in iop]
    return (letter(v[:3]), letter(v[3:]))


def _window(ds: Dataset, window: tuple[float, float] | None) -> tuple[float, float]:
    if window is not None:
        return (float(window[0]), float(window[1]))
    try:
        c, w = ds.WindowCenter, ds.WindowWidth
        c = float(c[0] if isinstance(c, Sequence) and not isinstance(c, str) else c)
        w = float(w[0] if isinstance(w, Sequence) and not isinstance(w, str) else w)
    except (AttributeError, TypeError, ValueError, IndexError):
        return _DEFAULT_WINDOW
    return (c, w) if w > 1 else _DEFAULT_WINDOW


def _series_sections(report: QualityReport) -> list[TableSection]:
    sections = []
    for scorer, out in report.scores.items():
        rows = tuple(
            (codes.output_concept(key).meaning, format_value(value, out.units.get(key, "")))
            for key, value in out.series.items()
        )
        sections.append(TableSection(f"{scorer}  (v{report.versions[scorer]})", rows))
    return sections


def _slice_rows(report: QualityReport, index: int) -> list[tuple[str, str]]:
    return [
        (codes.output_concept(key).meaning, format_value(values[index], out.units.get(key, "")))
        for out in report.scores.values()
        for key, values in out.slices.items()
    ]


def build_quality_map_sc(
    report: QualityReport,
    *,
    series_instance_uid: str,
    series_number: int,
    map_name: str | None = None,
    max_images: int | None = None,
    window: tuple[float, float] | None = None,
    colormap: str = "quality",
    alpha: float = 0.45,
    min_size: int = 512,
    manufacturer: str = "qgate",
    software_version: str = "0",
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> list[hd.sc.SCImage]:
    """Render the quality maps of one scored series as Secondary Capture images.

    Parameters
    ----------
    report: qgate.report.QualityReport
        What was scored and what the scorers and the gate said.
    series_instance_uid: str
        Series Instance UID of the new SC series (required).
    series_number: int
        Series Number of the new SC series (required, >= 1).
    map_name: Union[str, None], optional
        Map to overlay, ``"<scorer>.<map>"`` or an unambiguous bare map name. ``None``
        takes the first map of the first scorer that has one; without any map the images
        show the CT slice and the scores only.
    max_images: Union[int, None], optional
        Render at most this many slices, evenly spread over the series (first and last
        kept). ``None`` (default) renders every scored slice.
    window: Union[tuple[float, float], None], optional
        Grey-scale window (centre, width) in HU. Default: the first window of the
        source instances, else soft tissue (40, 400).
    colormap: str, optional
        ``"quality"`` (red = worse, green = better; default) or ``"viridis"``.
    alpha: float, optional
        Overlay opacity inside the body (default 0.45).
    min_size: int, optional
        Minimum height in pixels of the CT part; smaller slices are upscaled (default 512).
    manufacturer: str, optional
        Manufacturer of the creating device (default ``"qgate"``).
    software_version: str, optional
        qgate's version, written to Software Versions.
    transfer_syntax_uid: str, optional
        Explicit VR Little Endian (default) or RLE Lossless.

    Returns
    -------
    list[highdicom.sc.SCImage]
        One RGB image per rendered slice, Instance Numbers 1..N in slice order.

    Raises
    ------
    TypeError
        When ``report`` is not a QualityReport or an argument has the wrong type.
    ValueError
        When a UID, number, map name, window, colour map or transfer syntax is invalid.
    """
    if not isinstance(report, QualityReport):
        raise TypeError('Argument "report" must be a QualityReport.')
    check_uid("series_instance_uid", series_instance_uid)
    check_positive_int("series_number", series_number)
    if max_images is not None:
        check_positive_int("max_images", max_images)
    check_positive_int("min_size", min_size)
    if colormap not in colormap_names():
        raise ValueError(f"unknown colour map {colormap!r}; known: {', '.join(colormap_names())}")
    if UID(transfer_syntax_uid) not in _SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"transfer syntax {transfer_syntax_uid} is not supported")
    first = report.dataset_for_slice(0)
    win = _window(first, window)
    if win[1] <= 0:
        raise ValueError("window width must be positive")
    selected = report.select_map(map_name)  # ValueError on an unknown name

    vol = report.volume
    legend = None
    if selected is not None:
        m = selected.map
        legend = MapLegend(
            title=codes.output_concept(m.name).meaning,
            unit=m.unit,
            display_range=(float(m.display_range[0]), float(m.display_range[1])),
            higher_is_better=m.higher_is_better,
        )
    renderer = SliceRenderer(
        shape=(vol.hu.shape[1], vol.hu.shape[2]),
        window=win,
        decision=report.decision.value,
        reasons=report.reasons,
        series=_series_sections(report),
        legend=legend,
        colormap=colormap,
        alpha=alpha,
        min_size=min_size,
    )
    scale = renderer.pixel_scale
    spacing = (vol.pixel_spacing[0] / scale, vol.pixel_spacing[1] / scale)
    description = "qgate quality map" + (f" ({selected.key})" if selected else "")

    images = []
    n = vol.n_slices
    for number, i in enumerate(select_slices(n, max_images), start=1):
        ref = report.dataset_for_slice(i)
        rgb = renderer.render(
            vol.hu[i],
            selected.map.values[i] if selected is not None else None,
            header=f"Slice {i + 1}/{n}   z {vol.slice_positions[i]:.1f} mm",
            slice_rows=_slice_rows(report, i),
        )
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=number,
            manufacturer=manufacturer,
            pixel_spacing=spacing,
            patient_orientation=patient_orientation(ref),
            transfer_syntax_uid=transfer_syntax_uid,
            series_description=description,
            software_versions=software_version,
        )
        _add_derivation(sc, ref, vol.frame_numbers[i], report.decision.value)
        images.append(sc)
    return images


def _add_derivation(sc: Dataset, ref: Dataset, frame_number: int, decision: str) -> None:
    """Burned-in annotation flag and the reference to the CT instance rendered."""
    sc.BurnedInAnnotation = "YES"
    # Body part and laterality come from the CT; with neither known, Laterality is left
    # empty, which the General Series module allows for "unknown".
    for kw in ("BodyPartExamined", "Laterality", "ImageLaterality"):
        if ref.get(kw):
            setattr(sc, kw, ref.get(kw))
    if not any(kw in sc for kw in ("BodyPartExamined", "Laterality", "ImageLaterality")):
        sc.Laterality = ""
    sc.DerivationDescription = "CT slice with qgate quality map overlay and scores"
    source = Dataset()
    source.ReferencedSOPClassUID = ref.SOPClassUID
    source.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    if int(ref.get("NumberOfFrames", 1) or 1) > 1:
        source.ReferencedFrameNumber = frame_number
    source.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(std_codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [source]
    sc.ImageComments = f"qgate quality map; gate decision: {decision}"
