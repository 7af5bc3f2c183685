"""The quality SR: a TID 1500 Measurement Report of every scorer's series outputs.

Document layout (Enhanced SR, see :func:`build_quality_sr` for why)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")          TID 1500
      Language, Observation Context (device observer "qgate"), Procedure reported
      CONTAINER (126010, DCM, "Imaging Measurements")
        CONTAINER Measurement Group (one per scorer)               TID 1501
          Tracking Identifier / UID, Finding "Imaging Series Quality"
          Algorithm Name / Version                                 TID 4019
          IMAGE Source (one per slice the values come from; only when not every slice)
          NUM  <output>  value  UCUM unit   (+ TID 4019 again)     TID 300
          CODE <output> = <label>           (string outputs)
      CONTAINER (C0034375, UMLS, "Qualitative Evaluations")
        CODE Quality gate decision = Passed | Flagged for review
        TEXT Quality gate reason (one per reason)
        TEXT Part of quality report skipped (one per skipped scorer or object)
        TEXT Quality report generation
        TEXT Supersedes earlier quality report   (re-score only)

The scored series and all its instances are referenced from the Current Requested
Procedure Evidence Sequence. A measurement group lists source images only where that says
something: a scorer that read a subset of the slices (MD-IQA and Noise2Quality score
``scoring.*.max_slices`` of them; a classical measure may find nothing to measure on some)
names the slices its series values come from, the slices where any of its per-slice
outputs is finite. A scorer whose values come from every slice, or that gives no per-slice
outputs (Chest CT-IQA), lists none: its measurements derive from the images of the
document. ``source_images="all"`` (setting ``report.sr_source_images``) lists every
instance in every group instead, one IMAGE item per slice and scorer.

Per-slice values are not in the SR: the results JSON holds them, and the quality-map SC
images show them beside each rendered slice.
"""

from __future__ import annotations

import math
import socket
from typing import Literal, get_args

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as std_codes
from pydicom.uid import generate_uid

from qgate.report import codes
from qgate.report.content import GateDecision, QualityReport, check_positive_int, check_uid

#: Which images a measurement group names as its source (see the module docstring).
SourceImages = Literal["scored", "all"]
_SOURCE_IMAGES = get_args(SourceImages)

_NON_FINITE = {
    "nan": std_codes.DCM.NotANumber,
    "inf": std_codes.DCM.PositiveInfinity,
    "-inf": std_codes.DCM.NegativeInfinity,
}


def _device_observer(manufacturer: str) -> hd.sr.ObserverContext:
    uid = generate_uid(entropy_srcs=["qgate-device", socket.gethostname()])
    return hd.sr.ObserverContext(
        observer_type=std_codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid,
            name="qgate",
            manufacturer_name=manufacturer,
            model_name="qgate quality gate",
        ),
    )


def _character_set(report: QualityReport) -> str | None:
    """UTF-8 when our own text is not ASCII; otherwise the source's character set."""
    texts = [*report.reasons, *report.scores, *report.versions.values()]
    texts += [p.describe() for p in report.skipped]
    texts += [
        v for out in report.scores.values() for v in out.series.values() if isinstance(v, str)
    ]
    if "".join(texts).isascii():
        return report.source_datasets[0].get("SpecificCharacterSet")
    return "ISO_IR 192"


def _as_number(value: object) -> float | int:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return float(value)  # type: ignore[arg-type]


def _scored_slices(report: QualityReport, scorer: str) -> list[int]:
    """Slices a scorer's values come from, when not every slice; empty: every slice."""
    n = report.volume.n_slices
    finite = np.zeros(n, dtype=bool)
    for values in report.scores[scorer].slices.values():
        finite |= np.isfinite(np.asarray(values, dtype=np.float64))
    if finite.all() or not finite.any():
        return []
    return np.flatnonzero(finite).tolist()


def _source_images(
    report: QualityReport, scorer: str, mode: SourceImages
) -> list[hd.sr.SourceImageForMeasurementGroup]:
    """The group's TID 1501 source images: none stands for the document's images."""
    if mode == "all":
        return [
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
            )
            for ds in report.source_datasets
        ]
    vol = report.volume
    frames: dict[str, tuple[Dataset, list[int]]] = {}  # instance -> its frames, slice order
    for k in _scored_slices(report, scorer):
        uid = vol.sop_instance_uids[k]
        if uid not in frames:
            frames[uid] = (report.dataset_for_slice(k), [])
        frames[uid][1].append(vol.frame_numbers[k])
    images = []
    for uid, (ds, numbers) in frames.items():
        multiframe = int(ds.get("NumberOfFrames", 1) or 1) > 1
        images.append(
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=uid,
                referenced_frame_numbers=sorted(set(numbers)) if multiframe else None,
            )
        )
    return images


def _measurement_group(
    report: QualityReport, scorer: str, source_images: SourceImages
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    out = report.scores[scorer]
    algorithm = hd.sr.AlgorithmIdentification(name=scorer, version=report.versions[scorer])
    measurements: list[hd.sr.Measurement] = []
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    for key, raw in out.series.items():
        concept = codes.output_concept(key)
        if isinstance(raw, str):
            evaluations.append(
                hd.sr.QualitativeEvaluation(name=concept, value=codes.label_code(raw))
            )
            continue
        unit = codes.unit_code(out.units.get(key, "1"))
        value = _as_number(raw)
        if isinstance(value, float) and not math.isfinite(value):
            # A NUM cannot hold NaN/inf: say so with the CID 42 code as a CODE item.
            evaluations.append(
                hd.sr.QualitativeEvaluation(name=concept, value=_NON_FINITE[str(value)])
            )
            continue
        measurements.append(
            hd.sr.Measurement(name=concept, value=value, unit=unit, algorithm_id=algorithm)
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=f"{scorer} series quality", uid=generate_uid()
        ),
        finding_type=codes.SERIES_QUALITY,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=_source_images(report, scorer, source_images) or None,
    )


def _conclusions(report: QualityReport) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the gate decision, its reasons, what was skipped, the supersede note."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    decision = codes.DECISION_PASS if report.decision is GateDecision.PASS else codes.DECISION_FLAG
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(name=codes.GATE_DECISION, value=decision, relationship_type=contains)
    ]
    for reason in report.reasons:
        items.append(
            hd.sr.TextContentItem(name=codes.GATE_REASON, value=reason, relationship_type=contains)
        )
    for part in report.skipped:
        items.append(
            hd.sr.TextContentItem(
                name=codes.PART_SKIPPED, value=part.describe(), relationship_type=contains
            )
        )
    items.append(
        hd.sr.TextContentItem(
            name=codes.REPORT_GENERATION, value=str(report.generation), relationship_type=contains
        )
    )
    if report.previous_sr is not None:
        prev = report.previous_sr
        text = (
            f"This report (generation {report.generation}) supersedes quality report "
            f"{prev.SOPInstanceUID} after the series was re-scored; "
            "use this report, not the earlier one."
        )
        items.append(
            hd.sr.TextContentItem(name=codes.SUPERSEDES, value=text, relationship_type=contains)
        )
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=contains
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_quality_sr(
    report: QualityReport,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    manufacturer: str = "qgate",
    software_version: str = "0",
    institution_name: str | None = None,
    source_images: SourceImages = "scored",
) -> hd.sr.EnhancedSR:
    """Build the quality SR (TID 1500 Measurement Report) of one scored series.

    The document is an Enhanced SR: TID 1500 without spatial coordinates needs only NUM,
    CODE, TEXT, UIDREF, IMAGE and CONTAINER items with by-value relationships, which the
    Enhanced SR IOD allows, and it is the most widely supported SR class that carries
    numeric measurements.

    Parameters
    ----------
    report: qgate.report.QualityReport
        What was scored and what the scorers and the gate said.
    series_instance_uid: str
        Series Instance UID of the new SR series (required).
    series_number: int
        Series Number of the new SR series (required, >= 1).
    sop_instance_uid: Union[str, None], optional
        SOP Instance UID of the document; a new UID when ``None``.
    instance_number: int, optional
        Instance Number of the document (default 1).
    manufacturer: str, optional
        Manufacturer of the creating device (default ``"qgate"``).
    software_version: str, optional
        qgate's version, written to Software Versions.
    institution_name: Union[str, None], optional
        Institution Name of the creating device.
    source_images: str, optional
        ``"scored"`` (default): a measurement group lists the slices its values come from
        only when that is not every slice; ``"all"``: every group lists every instance.

    Returns
    -------
    highdicom.sr.EnhancedSR
        The document, ready to save or send. It references every source instance in its
        evidence, and its Predecessor Documents Sequence names ``report.previous_sr``.
        Each of ``report.skipped`` is a TEXT item, and the Completion Flag is PARTIAL
        when there is any.

    Raises
    ------
    TypeError
        When ``report`` is not a QualityReport or a required argument is missing.
    ValueError
        When a UID or number is invalid, an output's unit is not UCUM, or
        ``source_images`` is unknown.
    """
    if not isinstance(report, QualityReport):
        raise TypeError('Argument "report" must be a QualityReport.')
    check_uid("series_instance_uid", series_instance_uid)
    if sop_instance_uid is None:
        sop_instance_uid = generate_uid()
    check_uid("sop_instance_uid", sop_instance_uid)
    check_positive_int("series_number", series_number)
    check_positive_int("instance_number", instance_number)
    if source_images not in _SOURCE_IMAGES:
        raise ValueError(f'Argument "source_images" must be one of {_SOURCE_IMAGES}.')

    groups = [_measurement_group(report, name, source_images) for name in report.scores]
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=None,
            observer_device_context=_device_observer(manufacturer),
        ),
        procedure_reported=codes.PROCEDURE_CT,
        imaging_measurements=groups,
        title=codes.REPORT_TITLE,
    )
    content[0].ContentSequence.append(_conclusions(report))

    sr = hd.sr.EnhancedSR(
        evidence=list(report.source_datasets),
        content=content[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        # PARTIAL when a scorer or object was skipped: the report lacks part of its content.
        is_complete=not report.skipped,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        previous_versions=[report.previous_sr] if report.previous_sr is not None else None,
        coding_schemes=[codes.coding_scheme_identification()],
        series_description=f"qgate quality report ({report.decision.value})",
        software_versions=software_version,
        specific_character_set=_character_set(report),
    )
    return sr
