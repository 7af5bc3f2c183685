"""Report stage: the quality SR and the secondary-capture quality maps.

Inputs are synthetic (qgate.synth) with a hand-made ScoreOutput, independent of the real
scorers. Both objects are written to disk and checked with dciodvfy (dicom3tools) and,
for the SR, dsrdump (dcmtk); CI installs both.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from qgate.report import QualityReport, build_quality_map_sc, build_quality_sr
from qgate.report.render import SliceRenderer, resize_map
from qgate.report.sc import patient_orientation
from qgate.score.scorers.base import ScoreOutput, SeriesVolume, SliceMap
from qgate.synth import make_ct_series

N_SLICES = 4
SIZE = 64


def _volume(datasets: list[pydicom.Dataset]) -> SeriesVolume:
    hu = np.stack(
        [d.pixel_array.astype(np.float32) * d.RescaleSlope + d.RescaleIntercept for d in datasets]
    )
    return SeriesVolume(
        hu=hu,
        pixel_spacing=tuple(float(x) for x in datasets[0].PixelSpacing),
        slice_thickness=float(datasets[0].SliceThickness),
        slice_positions=tuple(float(d.ImagePositionPatient[2]) for d in datasets),
        sop_instance_uids=tuple(d.SOPInstanceUID for d in datasets),
        frame_numbers=(1,) * len(datasets),
        series_instance_uid=datasets[0].SeriesInstanceUID,
        study_instance_uid=datasets[0].StudyInstanceUID,
        sop_class_uid=datasets[0].SOPClassUID,
    )


def _scores(n: int, map_size: int = SIZE // 4) -> dict[str, ScoreOutput]:
    rng = np.random.default_rng(1)
    noise_map = rng.uniform(8, 30, (n, map_size, map_size)).astype(np.float32)
    return {
        "noise": ScoreOutput(
            series={"noise_sigma_hu": 14.2},
            slices={"noise_sigma_hu": [13.0 + i for i in range(n)]},
            units={"noise_sigma_hu": "HU"},
            maps=[SliceMap("local_noise", noise_map, "HU", (0.0, 40.0), higher_is_better=False)],
        ),
        "snr": ScoreOutput(
            series={"snr": 3.1, "dose_class": "low", "failed_output": float("nan")},
            slices={"snr": [3.0] * n},
            units={"snr": "1"},
        ),
    }


@pytest.fixture(scope="module")
def series() -> list[pydicom.Dataset]:
    return make_ct_series(N_SLICES, SIZE, SIZE, noise_hu=14.0)


@pytest.fixture
def report(series: list[pydicom.Dataset]) -> QualityReport:
    return QualityReport(
        source_datasets=series,
        volume=_volume(series),
        scores=_scores(N_SLICES),
        versions={"noise": "1.2.0", "snr": "0.3.1"},
        decision="flag",
        reasons=["noise sigma 14.2 HU > 12.0 HU", "SNR 3.1 < 5.0"],
    )


def _dciodvfy(ds: pydicom.Dataset, path: Path) -> str:
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert not errors, out
    return out


def _dsrdump(path: Path) -> str:
    run = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


# --- SR ------------------------------------------------------------------------------


def test_sr_is_valid_and_carries_every_output(report: QualityReport, tmp_path: Path) -> None:
    headers = []
    for ds in report.source_datasets:  # the SR needs headers only
        h = copy.deepcopy(ds)
        del h.PixelData
        headers.append(h)
    report = dataclasses.replace(report, source_datasets=headers)
    sr_uid = generate_uid()
    sr = build_quality_sr(report, series_instance_uid=sr_uid, series_number=901)

    assert sr.StudyInstanceUID == report.volume.study_instance_uid
    assert sr.SeriesInstanceUID == sr_uid
    assert sr.Modality == "SR"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == report.volume.series_instance_uid
    assert {i.ReferencedSOPInstanceUID for i in evidence.ReferencedSOPSequence} == set(
        report.volume.sop_instance_uids
    )
    assert "PredecessorDocumentsSequence" not in sr

    path = tmp_path / "sr.dcm"
    out = _dciodvfy(sr, path)
    assert "EnhancedSR" in out
    dump = _dsrdump(path)
    assert "Imaging Measurement Report" in dump
    assert '"Image noise (robust SD)")="14.2" ([hnsf\'U],UCUM' in dump
    assert '"Signal-to-noise ratio")="3.1" (1,UCUM' in dump
    assert '(low,99QGATE,"low")' in dump  # string output as a coded evaluation
    assert '(114000,DCM,"Not a number")' in dump  # NaN cannot be a NUM
    assert dump.count('"Algorithm Name")="noise"') >= 2  # group and measurement (TID 4019)
    assert '"Algorithm Version")="0.3.1"' in dump
    assert '(FLAG,99QGATE,"Flagged for review by quality gate")' in dump
    assert dump.count('"Quality gate reason"') == 2
    # Both scorers measured every slice: no per-group image list (the document's images).
    assert "IMAGE:" not in dump

    # Reads back with highdicom: one measurement group per scorer.
    doc = hd.sr.EnhancedSR.from_dataset(pydicom.dcmread(path))
    groups = hd.sr.MeasurementReport.from_sequence(doc.content).get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [
        "noise series quality",
        "snr series quality",
    ]
    noise = groups[0].get_measurements()[0]
    assert noise.value == pytest.approx(14.2)
    assert noise.unit.value == "[hnsf'U]"


def test_sr_source_images_name_the_scored_slices(report: QualityReport, tmp_path: Path) -> None:
    """A subsampled scorer's group names its scored slices; "all" names every instance."""
    scores = _scores(N_SLICES)
    nan = float("nan")
    scores["model"] = ScoreOutput(
        series={"score": 2.5, "slices_scored": 2},
        slices={"slice_scores": [3.0, nan, nan, 2.0], "other": [nan, nan, nan, 2.1]},
    )
    report = dataclasses.replace(report, scores=scores, versions={**report.versions, "model": "1"})
    uids = report.volume.sop_instance_uids

    sr = build_quality_sr(report, series_instance_uid=generate_uid(), series_number=901)
    path = tmp_path / "scored.dcm"
    _dciodvfy(sr, path)
    assert _dsrdump(path).count("IMAGE:") == 2
    doc = hd.sr.EnhancedSR.from_dataset(pydicom.dcmread(path))
    groups = hd.sr.MeasurementReport.from_sequence(doc.content).get_image_measurement_groups()
    sources = {
        g.tracking_identifier: [
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for i in g[0].ContentSequence
            if i.ValueType == "IMAGE"
        ]
        for g in groups
    }
    assert sources == {
        "noise series quality": [],
        "snr series quality": [],
        "model series quality": [uids[0], uids[3]],
    }

    every = build_quality_sr(
        report, series_instance_uid=generate_uid(), series_number=901, source_images="all"
    )
    path = tmp_path / "all.dcm"
    _dciodvfy(every, path)
    assert _dsrdump(path).count("IMAGE:") == 3 * N_SLICES


def test_sr_supersedes_previous_report(report: QualityReport, tmp_path: Path) -> None:
    first = build_quality_sr(report, series_instance_uid=generate_uid(), series_number=901)
    second_report = dataclasses.replace(
        report, decision="pass", reasons=[], generation=2, previous_sr=first
    )
    second = build_quality_sr(
        second_report,
        series_instance_uid=first.SeriesInstanceUID,
        series_number=901,
        instance_number=2,
    )
    pred = second.PredecessorDocumentsSequence[0]
    assert pred.StudyInstanceUID == first.StudyInstanceUID
    series_item = pred.ReferencedSeriesSequence[0]
    assert series_item.SeriesInstanceUID == first.SeriesInstanceUID
    ref = series_item.ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == first.SOPClassUID

    path = tmp_path / "sr2.dcm"
    _dciodvfy(second, path)
    dump = _dsrdump(path)
    assert '"Supersedes earlier quality report")' in dump
    assert '(PASS,99QGATE,"Passed quality gate")' in dump
    assert '"Quality report generation")="2"' in dump


def test_sr_non_ascii_text_switches_to_utf8(report: QualityReport, tmp_path: Path) -> None:
    report = dataclasses.replace(report, reasons=["σ = 14.2 HU ≥ 12.0 HU"])
    sr = build_quality_sr(report, series_instance_uid=generate_uid(), series_number=901)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    path = tmp_path / "sr.dcm"
    _dciodvfy(sr, path)
    assert "σ = 14.2 HU ≥ 12.0 HU" in _dsrdump(path)


# --- SC ------------------------------------------------------------------------------


def test_sc_maps_are_valid_rgb_in_the_same_study(report: QualityReport, tmp_path: Path) -> None:
    sc_uid = generate_uid()
    images = build_quality_map_sc(report, series_instance_uid=sc_uid, series_number=902)
    assert len(images) == N_SLICES
    for k, (img, uid) in enumerate(zip(images, report.volume.sop_instance_uids, strict=True)):
        assert img.StudyInstanceUID == report.volume.study_instance_uid
        assert img.SeriesInstanceUID == sc_uid
        assert img.InstanceNumber == k + 1
        assert img.PhotometricInterpretation == "RGB"
        assert img.BurnedInAnnotation == "YES"
        assert img.SourceImageSequence[0].ReferencedSOPInstanceUID == uid
    first = images[0]
    assert first.Rows >= 512  # small slices are upscaled so the text is legible
    assert first.Columns > first.Rows  # image plus side panel
    pixels = first.pixel_array
    assert pixels.shape == (first.Rows, first.Columns, 3)
    # The overlay is coloured inside the body: not every pixel there is grey.
    body = pixels[first.Rows // 2 - 20 : first.Rows // 2 + 20, 100:200].astype(int)
    assert np.abs(body[..., 0] - body[..., 1]).max() > 20
    _dciodvfy(first, tmp_path / "sc.dcm")


def test_sc_subsampling_and_map_selection(report: QualityReport) -> None:
    uid = generate_uid()
    images = build_quality_map_sc(
        report, series_instance_uid=uid, series_number=902, max_images=2, map_name="local_noise"
    )
    refs = [i.SourceImageSequence[0].ReferencedSOPInstanceUID for i in images]
    assert refs == [report.volume.sop_instance_uids[0], report.volume.sop_instance_uids[-1]]
    with pytest.raises(ValueError, match="no map matches"):
        build_quality_map_sc(report, series_instance_uid=uid, series_number=902, map_name="nope")


def test_patient_orientation_from_image_orientation() -> None:
    axial = pydicom.Dataset()
    axial.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    sagittal = pydicom.Dataset()
    sagittal.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    assert patient_orientation(axial) == ("L", "P")
    assert patient_orientation(sagittal) == ("P", "F")
    assert patient_orientation(pydicom.Dataset()) == ("L", "P")


def test_low_resolution_maps_are_resized() -> None:
    small = np.arange(16, dtype=np.float32).reshape(4, 4)
    small[0, 0] = np.nan
    big = resize_map(small, (32, 48))
    assert big.shape == (32, 48)
    assert np.isnan(big[0, 0]) and np.isfinite(big[-1, -1])

    hu = np.full((32, 48), -1000.0, np.float32)
    hu[8:24, 12:36] = 40.0
    renderer = SliceRenderer(
        shape=(32, 48),
        window=(40.0, 400.0),
        decision="pass",
        reasons=[],
        series=[],
        legend=None,
        min_size=64,
    )
    out = renderer.render(hu, None, header="Slice 1/1", slice_rows=[("x", "1")])
    assert out.dtype == np.uint8 and out.shape[0] == 64 and out.shape[2] == 3


# --- validation ----------------------------------------------------------------------


def test_quality_report_validation(report: QualityReport, series: list[pydicom.Dataset]) -> None:
    with pytest.raises(ValueError, match="pass"):
        dataclasses.replace(report, decision="maybe")
    with pytest.raises(TypeError, match="no version"):
        dataclasses.replace(report, versions={"noise": "1"})
    with pytest.raises(ValueError, match="per-slice values"):
        bad = _scores(N_SLICES)
        bad["noise"].slices["noise_sigma_hu"] = [1.0]
        dataclasses.replace(report, scores=bad)
    with pytest.raises(ValueError, match="map must have shape"):
        bad = _scores(N_SLICES)
        bad["noise"].maps[0].values = np.zeros((1, 4, 4), np.float32)
        dataclasses.replace(report, scores=bad)
    with pytest.raises(ValueError, match="generation >= 2"):
        sr = build_quality_sr(report, series_instance_uid=generate_uid(), series_number=1)
        dataclasses.replace(report, previous_sr=sr)
    with pytest.raises(ValueError, match="not an SR"):
        dataclasses.replace(report, generation=2, previous_sr=series[0])
    with pytest.raises(ValueError, match="scored series"):
        other = make_ct_series(1, 16, 16, study_uid=report.volume.study_instance_uid)
        dataclasses.replace(report, source_datasets=[*series, *other])
    with pytest.raises(TypeError, match="reasons"):
        dataclasses.replace(report, reasons="too loud")
    with pytest.raises(ValueError, match="at least one scorer"):
        dataclasses.replace(report, scores={})


def test_builder_argument_validation(report: QualityReport) -> None:
    uid = generate_uid()
    with pytest.raises(TypeError, match="QualityReport"):
        build_quality_sr({}, series_instance_uid=uid, series_number=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a valid UID"):
        build_quality_sr(report, series_instance_uid="1.2.abc", series_number=1)
    with pytest.raises(TypeError, match="series_number"):
        build_quality_sr(report, series_instance_uid=uid, series_number="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="series_number"):
        build_quality_map_sc(report, series_instance_uid=uid, series_number=0)
    with pytest.raises(ValueError, match="colour map"):
        build_quality_map_sc(report, series_instance_uid=uid, series_number=1, colormap="jet")
    with pytest.raises(ValueError, match="transfer syntax"):
        build_quality_map_sc(
            report, series_instance_uid=uid, series_number=1, transfer_syntax_uid="1.2.3"
        )
    with pytest.raises(ValueError, match="source_images"):
        build_quality_sr(
            report,
            series_instance_uid=uid,
            series_number=1,
            source_images="some",  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="UCUM"):
        bad = _scores(N_SLICES)
        bad["snr"].units["snr"] = "dB per slice"
        build_quality_sr(
            dataclasses.replace(report, scores=bad), series_instance_uid=uid, series_number=1
        )
