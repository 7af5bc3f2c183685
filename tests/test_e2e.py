"""End to end with real peers: dcmtk storescu -> ``qgate serve`` -> Orthanc.

Runs on SQLite and on PostgreSQL (the ``db_url`` fixture). Nothing is mocked: the modality
is storescu, the archive is the Debian Orthanc, and the objects qgate sends are read back
from Orthanc's REST API and checked with dciodvfy.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from qgate.synth import make_ct_series, write_series
from tests.conftest import free_port
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.qgate_proc import QgateProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _config(tmp_path: Path, db_url: str, archive_port: int, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "dicom": {"ae_title": "QGATE", "host": "127.0.0.1", "port": free_port()},
        "archive": {
            "ae_title": "ARCHIVE",
            "host": "127.0.0.1",
            "port": archive_port,
            "timeout": 10,
        },
        "series": {"stable_seconds": 30, "release_grace_seconds": 1, "poll_seconds": 0.2},
        "database": {"url": db_url},
        "storage": {"root": str(tmp_path / "var"), "fsync": True},
        "dispatch": {"backoff_initial_seconds": 0.5, "backoff_max_seconds": 2, "poll_seconds": 0.2},
        "queue": {"poll_seconds": 0.2},
        "gate": {"mode": "observe"},
    }
    for key, val in over.items():
        cfg[key] = {**cfg.get(key, {}), **val}
    return cfg


def dciodvfy_errors(data: bytes, tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / name
    path.write_bytes(data)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _results_delivered(q: QgateProcess, series_uid: str) -> dict[str, Any] | None:
    res = q.cli_json("results", "--series", series_uid, "--json")
    if res["status"] != "scored":
        return None
    sends = [
        o for o in q.cli_json("outbox", "list", "--json") if o["series_instance_uid"] == series_uid
    ]
    return res if sends and all(o["state"] == "sent" for o in sends) else None


SOP_CLASS_KIND = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.88.22": "SR",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.7": "SC",
    "1.2.840.10008.5.1.4.1.1.30": "PM",
}


def _study_series(archive: Orthanc, study_uid: str) -> dict[str, list[str]]:
    """Orthanc instances in the study by kind (CT, SR, SC, PM) -> list of instance ids."""
    found = archive.post(
        "/tools/find",
        {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
    )
    out: dict[str, list[str]] = {}
    for s in found:
        sop_class = archive.get_bytes(f"/instances/{s['Instances'][0]}/metadata/SopClassUid")
        kind = SOP_CLASS_KIND.get(sop_class.decode().strip(), sop_class.decode())
        out.setdefault(kind, []).extend(s["Instances"])
    return out


@pytest.fixture
def archive(tmp_path: Path):  # type: ignore[no-untyped-def]
    with start_orthanc(tmp_path / "orthanc", dicom_port=free_port(), http_port=free_port()) as a:
        yield a


def test_series_is_scored_and_reports_reach_the_archive(
    tmp_path: Path, db_url: str, archive: Orthanc
) -> None:
    n = 10
    datasets = make_ct_series(n, 256, 256, noise_hu=15.0, seed=3)
    files = write_series(datasets, tmp_path / "in")
    series_uid, study_uid = datasets[0].SeriesInstanceUID, datasets[0].StudyInstanceUID

    q = QgateProcess(tmp_path, _config(tmp_path, db_url, archive.dicom_port)).start()
    try:
        sent = q.storescu(files)
        assert sent.returncode == 0, sent.stderr
        res = q.wait_for(lambda: _results_delivered(q, series_uid), 180, "results delivered")
    finally:
        q.stop()

    assert res["study_instance_uid"] == study_uid
    assert res["decision"] in ("pass", "flag")
    assert res["instances"] == n
    assert 12.0 < res["scores"]["noise"]["noise_sigma_hu"] < 18.0
    assert len(res["scores"]["noise"]["slices"]["noise_sigma_hu"]) == n
    assert res["scores"]["snr"]["snr"] > 0

    by_kind = _study_series(archive, study_uid)
    assert set(by_kind) == {"SR", "SC", "PM"}  # observe mode: results only, no CT
    sr_ids, sc_ids, pm_ids = by_kind["SR"], by_kind["SC"], by_kind["PM"]
    assert len(sr_ids) == 1 and len(pm_ids) == 1
    assert len(sc_ids) == n
    assert 0.0 <= res["scores"]["mdiqa"]["score"] <= 4.0
    assert len(res["scores"]["mdiqa"]["slice_scores"]) == n
    assert {"mean_quality", "dose_class"} <= set(res["scores"]["n2q"])
    assert {"window_class", "dose_class", "snr", "brisque", "score"} <= set(
        res["scores"]["chestiqa"]
    )
    pm_bytes = archive.get_bytes(f"/instances/{pm_ids[0]}/file")
    assert dciodvfy_errors(pm_bytes, tmp_path, "pm.dcm") == []

    sr_bytes = archive.get_bytes(f"/instances/{sr_ids[0]}/file")
    assert dciodvfy_errors(sr_bytes, tmp_path, "sr.dcm") == []
    sr = pydicom.dcmread(tmp_path / "sr.dcm")
    assert sr.StudyInstanceUID == study_uid
    evidence = {
        i.ReferencedSOPInstanceUID
        for st in sr.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert evidence == {d.SOPInstanceUID for d in datasets}
    for k, iid in enumerate(sc_ids[:3]):
        assert (
            dciodvfy_errors(archive.get_bytes(f"/instances/{iid}/file"), tmp_path, f"sc{k}.dcm")
            == []
        )


def test_restart_mid_series_loses_nothing(tmp_path: Path, db_url: str, archive: Orthanc) -> None:
    n = 8
    datasets = make_ct_series(n, 128, 128, noise_hu=20.0, seed=5)
    files = write_series(datasets, tmp_path / "in")
    series_uid = datasets[0].SeriesInstanceUID
    cfg = _config(
        tmp_path,
        db_url,
        archive.dicom_port,
        series={"stable_seconds": 6, "release_grace_seconds": 6},
    )

    q = QgateProcess(tmp_path, cfg).start()
    first = q.storescu(files[: n // 2])
    assert first.returncode == 0, first.stderr
    q.stop(kill=True)  # a crash: no clean shutdown

    q.start()
    try:
        second = q.storescu(files[n // 2 :])
        assert second.returncode == 0, second.stderr
        res = q.wait_for(
            lambda: (r := _results_delivered(q, series_uid)) and r["slices_scored"] == n and r,
            180,
            "all instances scored",
        )
    finally:
        q.stop()
    assert res["instances"] == n
    assert len(res["scores"]["noise"]["slices"]["noise_sigma_hu"]) == n
    # A generation superseded before it was scored sends nothing; the newest SR in the
    # archive references every instance, those acknowledged before the crash included.
    sr_ids = _study_series(archive, datasets[0].StudyInstanceUID)["SR"]
    assert 1 <= len(sr_ids) <= res["generation"] + 1
    covered = []
    for k, iid in enumerate(sr_ids):
        (tmp_path / f"sr{k}.dcm").write_bytes(archive.get_bytes(f"/instances/{iid}/file"))
        sr = pydicom.dcmread(tmp_path / f"sr{k}.dcm")
        covered.append(
            {
                i.ReferencedSOPInstanceUID
                for st in sr.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence
                for i in se.ReferencedSOPSequence
            }
        )
    assert {d.SOPInstanceUID for d in datasets} in covered
