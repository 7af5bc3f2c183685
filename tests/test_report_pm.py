"""The Parametric Map of a real-valued quality map, and the report files with all scorers.

The PM is checked with dciodvfy (dicom3tools, 0 errors), read back with pydicom and
highdicom, and its float values and geometry compared with the map it was built from.
The last test scores a synthetic series with all five scorers (the learned ones on
random-init weights) and validates every object write_report produces.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from qgate.core.config import load_settings
from qgate.report import QualityReport, build_quality_map_pm
from qgate.report.sc import select_slices
from qgate.report.write import write_report
from qgate.score.pipeline import build_scorers, score_series
from qgate.score.scorers.base import ScoreOutput, SeriesVolume, SliceMap
from qgate.synth import make_ct_series, write_series
from tests.test_learned_scorers import write_random_weights

N_SLICES = 5
SIZE = 64
MAP = 32  # map grid: half the CT's, as a model grid would be


def _volume(datasets: list[pydicom.Dataset]) -> SeriesVolume:
    hu = np.stack([d.pixel_array.astype(np.float32) - 1024.0 for d in datasets])
    order = np.argsort([float(d.ImagePositionPatient[2]) for d in datasets])
    sorted_ds = [datasets[i] for i in order]
    return SeriesVolume(
        hu=hu[order],
        pixel_spacing=(0.8, 0.8),
        slice_thickness=2.5,
        slice_positions=tuple(float(d.ImagePositionPatient[2]) for d in sorted_ds),
        sop_instance_uids=tuple(d.SOPInstanceUID for d in sorted_ds),
        frame_numbers=(1,) * len(datasets),
        series_instance_uid=datasets[0].SeriesInstanceUID,
        study_instance_uid=datasets[0].StudyInstanceUID,
        sop_class_uid=datasets[0].SOPClassUID,
    )


def _dciodvfy(path: Path) -> str:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert not errors, out
    return out


@pytest.fixture(scope="module")
def series() -> list[pydicom.Dataset]:
    return make_ct_series(N_SLICES, SIZE, SIZE, noise_hu=12.0)


@pytest.fixture
def report(series: list[pydicom.Dataset]) -> QualityReport:
    vol = _volume(series)
    rng = np.random.default_rng(3)
    qmap = rng.uniform(-0.2, 1.0, (N_SLICES, MAP, MAP)).astype(np.float32)
    qmap[[1, 3]] = np.nan  # a subsampled scorer: slices 0, 2, 4 mapped
    return QualityReport(
        source_datasets=series,
        volume=vol,
        scores={
            "n2q": ScoreOutput(
                series={"mean_quality": 0.61, "dose_class": 25},
                slices={"mean_quality": [0.6, np.nan, 0.62, np.nan, 0.61]},
                units={"mean_quality": "1", "dose_class": "%"},
                maps=[SliceMap("quality", qmap, "1", (0.0, 1.0), higher_is_better=True)],
            )
        },
        versions={"n2q": "1.0.0+0123456789ab"},
        decision="pass",
    )


def test_pm_is_valid_and_round_trips(report: QualityReport, tmp_path: Path) -> None:
    uid = generate_uid()
    pm = build_quality_map_pm(report, series_instance_uid=uid, series_number=9903)
    path = tmp_path / "pm.dcm"
    pm.save_as(path, enforce_file_format=True)
    _dciodvfy(path)

    ds = pydicom.dcmread(path)
    vol = report.volume
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert ds.StudyInstanceUID == vol.study_instance_uid
    assert ds.SeriesInstanceUID == uid != vol.series_instance_uid
    assert ds.PatientID == report.source_datasets[0].PatientID
    assert "FloatPixelData" in ds and ds.BitsAllocated == 32
    assert (ds.NumberOfFrames, ds.Rows, ds.Columns) == (3, MAP, MAP)

    # The CT instances of the mapped slices are referenced.
    mapped = [0, 2, 4]
    refs = {
        item.ReferencedSOPInstanceUID
        for s in ds.ReferencedSeriesSequence
        for item in s.ReferencedInstanceSequence
    }
    assert refs == {vol.sop_instance_uids[i] for i in mapped}

    # Real-world value mapping: identity, unitless (UCUM "1"), the SSIM quantity.
    shared = ds.SharedFunctionalGroupsSequence[0]
    rwvm = shared.RealWorldValueMappingSequence[0]
    assert rwvm.LUTLabel == "SSIM"
    assert (rwvm.RealWorldValueSlope, rwvm.RealWorldValueIntercept) == (1.0, 0.0)
    unit = rwvm.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
    values = report.scores["n2q"].maps[0].values
    lo = rwvm.DoubleFloatRealWorldValueFirstValueMapped
    hi = rwvm.DoubleFloatRealWorldValueLastValueMapped
    assert lo <= float(np.nanmin(values)) and hi >= float(np.nanmax(values))

    # Geometry: spacing x2 (32 map pixels over 64 CT pixels), first centre shifted inside.
    measures = shared.PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([1.6, 1.6])
    z_of_slice = {round(z, 3): i for i, z in enumerate(vol.slice_positions)}
    pixels = ds.pixel_array
    assert pixels.dtype == np.float32
    seen = []
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        x, y, z = (float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        i = z_of_slice[round(z, 3)]
        src = report.dataset_for_slice(i)
        assert x == pytest.approx(float(src.ImagePositionPatient[0]) + 0.4)
        assert y == pytest.approx(float(src.ImagePositionPatient[1]) + 0.4)
        np.testing.assert_array_equal(pixels[k], values[i])  # float32, bit for bit
        seen.append(i)
    assert sorted(seen) == mapped

    back = hd.pm.ParametricMap.from_dataset(ds)
    assert back.SeriesInstanceUID == uid


def test_pm_argument_checks(report: QualityReport) -> None:
    with pytest.raises(TypeError):
        build_quality_map_pm("report", series_instance_uid=generate_uid(), series_number=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid UID"):
        build_quality_map_pm(report, series_instance_uid="not-a-uid", series_number=1)
    with pytest.raises(ValueError, match=">= 1"):
        build_quality_map_pm(report, series_instance_uid=generate_uid(), series_number=0)
    with pytest.raises(ValueError, match="no map matches"):
        build_quality_map_pm(
            report, series_instance_uid=generate_uid(), series_number=1, map_name="noise.x"
        )
    empty = report.scores["n2q"].maps[0]
    empty.values = np.full_like(empty.values, np.nan)
    with pytest.raises(ValueError, match="no finite value"):
        build_quality_map_pm(report, series_instance_uid=generate_uid(), series_number=1)


@pytest.fixture
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.usefixtures("_one_thread")
def test_report_files_with_all_five_scorers_validate(tmp_path: Path) -> None:
    weights = write_random_weights(tmp_path / "weights")
    settings = load_settings(
        path=None,
        scoring={
            "scorers": ["noise", "snr", "mdiqa", "n2q", "chestiqa"],
            "device": "cpu",
            "mdiqa": {"weights": str(weights["mdiqa"]), "max_slices": 3},
            "n2q": {"weights": str(weights["n2q"]), "max_slices": 3},
            "chestiqa": {"weights": str(weights["chestiqa"])},
        },
    )
    paths = write_series(make_ct_series(6, 128, 128, noise_hu=15.0), tmp_path / "ct")
    scored = score_series(paths, build_scorers(settings), settings.gate.thresholds)
    written = write_report(scored, tmp_path / "out", previous_sr=None, generation=0, fsync=False)
    files, sr_uid = written.paths, written.sr_uid
    assert written.skipped_parts == []  # nothing to degrade on a well-formed CT
    names = [p.name for p in files]
    # SR first, one SC image per slice the (subsampled) N2Q map covers, then the PM.
    assert names == ["sr.dcm", "sc00000.dcm", "sc00001.dcm", "sc00002.dcm", "pm.dcm"]
    for p in files:
        _dciodvfy(p)
    sr = pydicom.dcmread(files[0])
    assert sr.SOPInstanceUID == sr_uid
    algorithms = {
        item.TextValue
        for item in _walk(sr)
        if item.get("ValueType") == "TEXT"
        and item.ConceptNameCodeSequence[0].CodeValue == "111001"  # Algorithm Name
    }
    assert {"noise", "snr", "mdiqa", "n2q", "chestiqa"} <= algorithms
    # The subsampled models' groups name their 3 scored slices; Chest CT-IQA's none.
    scored_uids = [scored.loaded.volume.sop_instance_uids[k] for k in select_slices(6, 3)]
    sources = _group_sources(sr)
    assert sources["mdiqa"] == sources["n2q"] == scored_uids
    assert sources["chestiqa"] == []
    sc = pydicom.dcmread(files[1])
    assert "n2q.quality" in sc.SeriesDescription
    pm = pydicom.dcmread(files[-1])
    assert pm.NumberOfFrames == 3 and pm.StudyInstanceUID == sr.StudyInstanceUID


def _group_sources(sr: pydicom.Dataset) -> dict[str, list[str]]:
    """Algorithm name -> the source images its measurement group lists (TID 1501)."""
    measurements = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    out = {}
    for group in measurements.ContentSequence:
        items = group.ContentSequence
        name = next(
            i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "111001"
        )
        out[name] = [
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for i in items
            if i.ValueType == "IMAGE"
        ]
    return out


def _walk(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)
