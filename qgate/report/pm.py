"""The quality-map Parametric Map: a scorer's real-valued map as one multi-frame instance.

The secondary-capture series (:mod:`qgate.report.sc`) is for eyes; this object is for
software: the map values themselves (float32 Float Pixel Data), with a Real World Value
Mapping that says what they mean and in which unit, on the patient geometry of the scored
CT, in the study of the scored series (new series), referencing the CT instances it was
derived from. qgate writes it for the Noise2Quality map (predicted SSIM, unitless).

Geometry: a map of shape (slices, r, c) is taken to cover the whole field of view of each
slice (the learned scorers resize the whole slice to their input grid), so its pixel
spacing is the CT's times rows / r and columns / c, and the centre of map pixel (0, 0) lies
half a map pixel inside the corner of the CT slice. Only slices with at least one finite
map value become frames (a subsampled scorer leaves the other slices NaN), in slice order.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from qgate.core.degrade import NotApplicable, SkipReason
from qgate.report import codes
from qgate.report.content import NamedMap, QualityReport, check_positive_int, check_uid

#: Known maps: LUT label (<= 16 characters), explanation, quantity. Others get generic ones.
_KNOWN_MAPS: dict[str, tuple[str, str, Code]] = {
    "n2q.quality": (
        "SSIM",
        "Predicted SSIM against full dose (Noise2Quality)",
        Code("SSIM", codes.SCHEME, "Structural similarity index"),
    ),
}


def _frame_geometry(ds: Dataset, frame_number: int) -> tuple[list[float], list[float]]:
    """(ImagePositionPatient, ImageOrientationPatient) of one frame of a CT instance."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        groups = [ds.PerFrameFunctionalGroupsSequence[frame_number - 1]]
        groups += list(ds.get("SharedFunctionalGroupsSequence", []))
        ipp = iop = None
        for g in groups:
            if ipp is None and "PlanePositionSequence" in g:
                ipp = g.PlanePositionSequence[0].get("ImagePositionPatient")
            if iop is None and "PlaneOrientationSequence" in g:
                iop = g.PlaneOrientationSequence[0].get("ImageOrientationPatient")
    else:
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
        raise ValueError(
            f"instance {ds.SOPInstanceUID} frame {frame_number} has no patient position or "
            "orientation; a parametric map needs the CT's geometry"
        )
    return [float(v) for v in ipp], [float(v) for v in iop]


def _is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds


def build_quality_map_pm(
    report: QualityReport,
    *,
    series_instance_uid: str,
    series_number: int,
    map_name: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    manufacturer: str = "qgate",
    software_version: str = "0",
    device_serial_number: str = "0",
) -> hd.pm.ParametricMap:
    """Store one scorer map of a scored series as a float32 Parametric Map.

    Parameters
    ----------
    report: qgate.report.QualityReport
        What was scored and what the scorers said.
    series_instance_uid: str
        Series Instance UID of the new Parametric Map series (required).
    series_number: int
        Series Number of the new series (required, >= 1).
    map_name: Union[str, None], optional
        ``"<scorer>.<map>"`` or an unambiguous bare map name (see
        :meth:`QualityReport.select_map`); ``None`` takes ``n2q.quality`` when present,
        else the first map.
    sop_instance_uid: Union[str, None], optional
        SOP Instance UID of the map; a new UID when ``None``.
    instance_number: int, optional
        Instance Number (default 1).
    manufacturer: str, optional
        Manufacturer of the creating device (default ``"qgate"``).
    software_version: str, optional
        qgate's version, written to Software Versions; the scorer's version goes to the
        Content Description.
    device_serial_number: str, optional
        Device Serial Number (required by the IOD; default ``"0"``).

    Returns
    -------
    highdicom.pm.ParametricMap
        One frame per slice the scorer mapped, Float Pixel Data, a Real World Value
        Mapping (identity: stored value = real-world value) in the map's UCUM unit.

    Raises
    ------
    TypeError
        When ``report`` is not a QualityReport or an argument has the wrong type.
    ValueError
        When no map matches, the map has no finite value, a UID or number is invalid, or
        the CT lacks patient geometry.
    qgate.core.degrade.NotApplicable
        (a ValueError) When the CT has no Frame of Reference UID (reason
        ``no_frame_of_reference``): the IOD needs one, and qgate does not invent it.
    """
    if not isinstance(report, QualityReport):
        raise TypeError('Argument "report" must be a QualityReport.')
    check_uid("series_instance_uid", series_instance_uid)
    check_positive_int("series_number", series_number)
    check_positive_int("instance_number", instance_number)
    if sop_instance_uid is None:
        sop_instance_uid = generate_uid()
    check_uid("sop_instance_uid", sop_instance_uid)
    selected = _select(report, map_name)

    values = np.asarray(selected.map.values, dtype=np.float32)
    vol = report.volume
    frames = [i for i in range(vol.n_slices) if np.isfinite(values[i]).any()]
    if not frames:
        raise ValueError(f"map {selected.key} has no finite value on any slice")
    pixels = np.ascontiguousarray(values[frames])
    _, r, c = pixels.shape
    scale_r, scale_c = vol.hu.shape[1] / r, vol.hu.shape[2] / c
    row_sp, col_sp = vol.pixel_spacing
    map_spacing = (row_sp * scale_r, col_sp * scale_c)

    positions = []
    orientation: list[float] | None = None
    for i in frames:
        ipp, iop = _frame_geometry(report.dataset_for_slice(i), vol.frame_numbers[i])
        orientation = orientation or iop
        along_row, along_col = np.asarray(iop[:3]), np.asarray(iop[3:])
        # Centre of map pixel (0, 0): half a map pixel inside the CT slice's corner.
        shift = 0.5 * (scale_c - 1) * col_sp * along_row + 0.5 * (scale_r - 1) * row_sp * along_col
        positions.append(
            hd.PlanePositionSequence(
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                image_position=[float(v) for v in np.asarray(ipp) + shift],
            )
        )
    assert orientation is not None

    sources = _source_images(report, frames)
    if not all(ds.get("FrameOfReferenceUID") for ds in sources):
        # Checked before highdicom would refuse, so the caller gets a typed reason.
        raise NotApplicable(
            SkipReason.NO_FRAME_OF_REFERENCE,
            "the CT has no Frame of Reference UID, which a Parametric Map requires",
        )
    label, explanation, quantity = _describe(selected)
    finite = pixels[np.isfinite(pixels)]
    lo, hi = (float(v) for v in selected.map.display_range)
    value_range = (min(lo, float(finite.min())), max(hi, float(finite.max())))
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label,
        lut_explanation=explanation,
        unit=codes.unit_code(selected.map.unit),
        value_range=value_range,
        slope=1.0,
        intercept=0.0,
        quantity_definition=quantity,
    )
    version = report.versions[selected.scorer]
    pm = hd.pm.ParametricMap(
        source_images=sources[:1] if _is_multiframe(sources[0]) else sources,
        further_source_images=sources[1:] if _is_multiframe(sources[0]) else None,
        pixel_array=pixels,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name="qgate quality gate",
        software_versions=software_version,
        device_serial_number=device_serial_number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=(lo + hi) / 2, window_width=hi - lo)
        ],
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=map_spacing,
            slice_thickness=vol.slice_thickness or 1.0,
        ),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            image_orientation=orientation,
        ),
        plane_positions=positions,
        content_label=label.upper().replace(" ", "_")[:16],
        content_description=f"{selected.key} v{version}"[:64],
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        series_description=f"qgate {selected.key} map",
        coding_schemes=[codes.coding_scheme_identification()],
    )
    _copy_body_part(pm, sources[0])
    return pm


def _copy_body_part(pm: Dataset, ref: Dataset) -> None:
    """Body part and laterality from the CT; empty Laterality (unknown) when neither is known.

    General Series needs Laterality (type 2C) unless the body part says it is not paired.
    """
    for kw in ("BodyPartExamined", "Laterality"):
        if ref.get(kw):
            setattr(pm, kw, ref.get(kw))
    if "BodyPartExamined" not in pm and "Laterality" not in pm:
        pm.Laterality = ""


def _select(report: QualityReport, map_name: str | None) -> NamedMap:
    if map_name is None:
        maps = report.maps()
        keys = [m.key for m in maps]
        map_name = "n2q.quality" if "n2q.quality" in keys else None
    selected = report.select_map(map_name)  # ValueError on an unknown name
    if selected is None:
        raise ValueError("the report has no map to store")
    return selected


def _source_images(report: QualityReport, frames: Sequence[int]) -> list[Dataset]:
    """The CT instances of the mapped slices, once each, in slice order."""
    seen: dict[str, Dataset] = {}
    for i in frames:
        ds = report.dataset_for_slice(i)
        seen.setdefault(str(ds.SOPInstanceUID), ds)
    return list(seen.values())


def _describe(selected: NamedMap) -> tuple[str, str, Code]:
    known = _KNOWN_MAPS.get(selected.key)
    if known is not None:
        return known
    concept = codes.output_concept(selected.map.name)
    label = selected.map.name[:16] or "MAP"
    return label, f"{concept.meaning} ({selected.scorer})"[:64], concept
