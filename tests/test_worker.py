"""The integration layer on real components, on SQLite and PostgreSQL.

Series arrive through the real receive SCP (dcmtk ``storescu``) or, for inputs the SCP
would refuse, as spool files with their rows; then the stages are driven one step at a
time: ``queue_complete_series`` -> ``work_once`` -> ``dispatcher.run_once`` into a real
Orthanc, whose REST API says what the archive actually got. Nothing is mocked; the one
test-only piece is a scorer that raises, registered through the public registry.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from click.testing import Result as CliResult
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.assemble import queue_complete_series
from qgate.cli import main
from qgate.config import ArchiveConfig, DispatchConfig, GateConfig, QueueConfig, Settings
from qgate.db.models import Event, Instance, Job, OutboxItem, Result, Series, utcnow
from qgate.dispatch import run_once
from qgate.gate import ReleaseError, release_series
from qgate.pipeline import build_scorers
from qgate.queue import claim
from qgate.receive import start_scp
from qgate.results import list_results
from qgate.scoring import ScoreOutput, SeriesVolume, register_scorer
from qgate.synth import make_ct_series, write_series
from qgate.worker import process_job, work_once
from tests.conftest import free_port
from tests.support.dicomfiles import storescu
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.qgate_proc import QgateProcess

OWNER = "test/worker-0"
LATER = dt.timedelta(hours=1)  # "now" for the assembler: every series looks complete
BOOM = "test-worker-boom"


@register_scorer(BOOM)
class _BoomScorer:
    """A scorer that always raises: a retryable failure (not a SeriesLoadError)."""

    name = BOOM
    version = "0"

    def score(self, volume: SeriesVolume) -> ScoreOutput:
        raise RuntimeError("scorer exploded on purpose")


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Orthanc]:
    with start_orthanc(tmp_path / "orthanc", dicom_port=free_port(), http_port=free_port()) as a:
        yield a
        a.stop(kill=True)


@pytest.fixture
def scp(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[ThreadedAssociationServer]:
    server = start_scp(settings, sessions)
    yield server
    server.shutdown()


def configure(settings: Settings, archive: Orthanc | None = None, **update: Any) -> Settings:
    """``settings`` with the archive at ``archive`` and fast dispatch retries."""
    port = archive.dicom_port if archive is not None else free_port()
    return settings.model_copy(
        update={
            "archive": ArchiveConfig(ae_title="ARCHIVE", host="127.0.0.1", port=port, timeout=5),
            "dispatch": DispatchConfig(
                max_attempts=2, backoff_initial_seconds=0.1, poll_seconds=0.1
            ),
            **update,
        }
    )


def phantom(n: int = 3, noise_hu: float = 10.0, seed: int = 1, **kw: Any) -> list[Dataset]:
    return make_ct_series(n, 128, 128, noise_hu=noise_hu, seed=seed, **kw)


def arrive(settings: Settings, files: list[Path]) -> None:
    """Send ``files`` to the in-process SCP with storescu; every one must be stored."""
    out = storescu(settings.dicom.port, files)
    assert out.returncode == 0 and "Failed" not in out.stderr, out.stderr


def complete(settings: Settings, sessions: sessionmaker[Session]) -> list[str]:
    return queue_complete_series(sessions, settings.series, now=utcnow() + LATER)


def score_all(settings: Settings, sessions: sessionmaker[Session]) -> list[str]:
    """Run the worker until the queue is empty; the outcome of each job."""
    scorers = build_scorers(settings)
    outcomes = []
    while (outcome := work_once(settings, sessions, scorers, owner=OWNER)) is not None:
        outcomes.append(outcome)
    return outcomes


def deliver(settings: Settings, sessions: sessionmaker[Session]) -> list[tuple[str, str, str]]:
    """Send everything due; every outbox item must end up sent. Returns (series, kind, state)."""
    run_once(settings, sessions, owner="test/dispatch")
    with sessions() as s:
        items = list(s.scalars(select(OutboxItem).order_by(OutboxItem.id)))
    assert all(i.state == "sent" for i in items), [(i.state, i.last_error) for i in items]
    return [(i.series_instance_uid, i.kind, i.state) for i in items]


def archived(archive: Orthanc, study_uid: str) -> dict[str, set[str]]:
    """Series Instance UID -> SOP Instance UIDs that Orthanc holds in the study."""
    found = archive.post(
        "/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}}
    )
    uids = [archive.get(f"/series/{sid}")["MainDicomTags"]["SeriesInstanceUID"] for sid in found]
    return {uid: archive.sop_instance_uids(uid) for uid in uids}


def current(sessions: sessionmaker[Session], series_uid: str) -> Result:
    with sessions() as s:
        res = s.scalar(
            select(Result).where(
                Result.series_instance_uid == series_uid, Result.superseded_by.is_(None)
            )
        )
        assert res is not None
        return res


def report_objects(result: Result) -> dict[str, set[str]]:
    """What the worker wrote for ``result``: SR and SC series -> SOP Instance UIDs."""
    assert result.sr_path is not None
    out: dict[str, set[str]] = {}
    modalities = set()
    for p in Path(result.sr_path).parent.glob("*.dcm"):
        ds = dcmread(p, stop_before_pixels=True)
        out.setdefault(ds.SeriesInstanceUID, set()).add(ds.SOPInstanceUID)
        modalities.add(ds.Modality)
    # The SR series, the quality-map SC series and, with the n2q scorer, the parametric map.
    has_pm = (Path(result.sr_path).parent / "pm.dcm").exists()
    assert "SR" in modalities and len(out) == 2 + has_pm
    assert {len(v) for v in out.values()} == {1, result.slices_scored}
    return out


def series_row(sessions: sessionmaker[Session], uid: str) -> Series:
    with sessions() as s:
        row = s.get(Series, uid)
        assert row is not None
        return row


def jobs_of(sessions: sessionmaker[Session], uid: str) -> list[Job]:
    with sessions() as s:
        return list(s.scalars(select(Job).where(Job.series_instance_uid == uid).order_by(Job.id)))


def events_of(sessions: sessionmaker[Session], uid: str, stage: str) -> list[str]:
    with sessions() as s:
        q = select(Event.event).where(Event.series_instance_uid == uid, Event.stage == stage)
        return list(s.scalars(q.order_by(Event.id)))


def list_results_of(sessions: sessionmaker[Session]) -> list[dict[str, Any]]:
    with sessions() as s:
        return list_results(s)


def strict_json(text: str) -> Any:
    def no_constants(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=no_constants)


def cli(settings: Settings, workdir: Path) -> QgateProcess:
    """``qgate --config`` (a subprocess) on the same database, spool and archive as ``settings``."""
    config = {
        "database": {"url": settings.database.url},
        "storage": {"root": str(settings.storage.root), "fsync": False},
        "archive": settings.archive.model_dump(),
        "dicom": {"port": free_port(), "host": "127.0.0.1"},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    return QgateProcess(workdir, config)


def invoke(proc: QgateProcess, *args: str) -> CliResult:
    """The same command line as ``proc.cli``, in-process (no interpreter start-up)."""
    return CliRunner().invoke(
        main, ["--config", str(proc.config_path), *args], catch_exceptions=False
    )


def spool_rows(
    settings: Settings,
    sessions: sessionmaker[Session],
    series_uid: str,
    files: dict[str, bytes],
    *,
    study_uid: str = "1.2.826.0.1.3680043.10.1",
) -> None:
    """Put ``files`` (SOP Instance UID -> bytes) in the spool with their rows, as received."""
    folder = settings.spool_dir / series_uid
    folder.mkdir(parents=True, exist_ok=True)
    now = utcnow()
    with sessions.begin() as s:
        s.add(
            Series(
                series_instance_uid=series_uid,
                study_instance_uid=study_uid,
                modality="CT",
                status="receiving",
                instance_count=len(files),
                first_received_at=now,
                last_received_at=now,
            )
        )
        s.flush()
        for k, (sop_uid, data) in enumerate(files.items()):
            path = folder / f"{sop_uid}.dcm"
            path.write_bytes(data)
            s.add(
                Instance(
                    sop_instance_uid=sop_uid,
                    sop_class_uid=CTImageStorage,
                    series_instance_uid=series_uid,
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    path=str(path.absolute()),
                    size=len(data),
                    instance_number=k + 1,
                    received_at=now,
                )
            )


# -- 1. modes --------------------------------------------------------------------------------


def test_observe_sends_results_only_and_forward_adds_the_originals(
    settings: Settings,
    sessions: sessionmaker[Session],
    scp: ThreadedAssociationServer,
    archive: Orthanc,
    tmp_path: Path,
) -> None:
    observed, forwarded = phantom(3, seed=1), phantom(3, seed=2)
    a_uid, b_uid = observed[0].SeriesInstanceUID, forwarded[0].SeriesInstanceUID
    arrive(settings, write_series(observed, tmp_path / "a"))
    assert complete(settings, sessions) == [a_uid]  # queued first, so scored first
    arrive(settings, write_series(forwarded, tmp_path / "b"))
    assert complete(settings, sessions) == [b_uid]

    # The mode is read when a job commits: score each series under its own mode.
    observe = configure(settings, archive, gate=GateConfig(mode="observe"))
    forward = configure(settings, archive, gate=GateConfig(mode="forward"))
    scorers = build_scorers(settings)
    assert work_once(observe, sessions, scorers, owner=OWNER) == "scored"
    assert work_once(forward, sessions, scorers, owner=OWNER) == "scored"
    assert work_once(forward, sessions, scorers, owner=OWNER) is None
    assert deliver(observe, sessions) == [
        (a_uid, "results", "sent"),
        (b_uid, "results", "sent"),
        (b_uid, "forward", "sent"),
    ]

    # observe: the SR and the SC series reach the archive, the CT does not.
    res_a = current(sessions, a_uid)
    assert (res_a.decision, res_a.generation, res_a.slices_scored) == ("pass", 0, 3)
    assert archived(archive, observed[0].StudyInstanceUID) == report_objects(res_a)
    assert archive.sop_instance_uids(a_uid) == set()
    # forward: the same, plus every original instance.
    res_b = current(sessions, b_uid)
    assert archived(archive, forwarded[0].StudyInstanceUID) == {
        **report_objects(res_b),
        b_uid: {d.SOPInstanceUID for d in forwarded},
    }
    assert [series_row(sessions, u).held for u in (a_uid, b_uid)] == [False, False]
    assert [j.state for j in jobs_of(sessions, a_uid) + jobs_of(sessions, b_uid)] == ["done"] * 2


def test_gate_forwards_passing_holds_flagged_until_released(
    settings: Settings,
    sessions: sessionmaker[Session],
    scp: ThreadedAssociationServer,
    archive: Orthanc,
    tmp_path: Path,
) -> None:
    gate = configure(settings, archive, gate=GateConfig(mode="gate"))
    clean, noisy = phantom(3, noise_hu=10.0, seed=3), phantom(3, noise_hu=60.0, seed=4)
    clean_uid, noisy_uid = clean[0].SeriesInstanceUID, noisy[0].SeriesInstanceUID
    arrive(settings, write_series(clean, tmp_path / "clean"))
    arrive(settings, write_series(noisy, tmp_path / "noisy"))
    assert len(complete(gate, sessions)) == 2
    assert score_all(gate, sessions) == ["scored", "scored"]
    deliver(gate, sessions)

    ok, held = series_row(sessions, clean_uid), series_row(sessions, noisy_uid)
    assert (ok.status, ok.decision, ok.held) == ("scored", "pass", False)
    assert (held.status, held.decision, held.held) == ("scored", "flag", True)
    assert events_of(sessions, noisy_uid, "gate") == ["held"]
    by_uid = {r["series_instance_uid"]: r for r in list_results_of(sessions)}
    assert by_uid[noisy_uid]["held"] is True and by_uid[noisy_uid]["decision"] == "flag"
    assert any(
        "noise_sigma_hu" in r and "above the limit 30" in r for r in by_uid[noisy_uid]["reasons"]
    )

    clean_ct = {d.SOPInstanceUID for d in clean}
    noisy_ct = {d.SOPInstanceUID for d in noisy}
    assert archive.sop_instance_uids(clean_uid) == clean_ct  # passed: forwarded
    assert archive.sop_instance_uids(noisy_uid) == set()  # flagged: held back
    noisy_study = archived(archive, noisy[0].StudyInstanceUID)
    assert noisy_study == report_objects(current(sessions, noisy_uid))  # its results went

    # The operator releases it from the command line.
    qgate = cli(gate, tmp_path / "cli")
    unknown = invoke(qgate, "release", "1.2.826.0.1.3680043.10.999")
    assert (unknown.exit_code, unknown.stdout) == (1, "")
    assert "no such series: 1.2.826.0.1.3680043.10.999" in unknown.stderr
    released = qgate.cli("release", noisy_uid, check=False)
    assert released.returncode == 0, released.stderr
    assert f"released {noisy_uid}: 3 instance(s) queued" in released.stdout
    assert not series_row(sessions, noisy_uid).held
    assert events_of(sessions, noisy_uid, "gate") == ["held", "released"]

    # A series that is not held (never, or no longer) cannot be released.
    with sessions() as s:
        for uid in (clean_uid, noisy_uid):
            with pytest.raises(ReleaseError, match=f"series {uid} is not held"):
                release_series(s, gate, uid)
        with pytest.raises(ReleaseError, match="no such series"):
            release_series(s, gate, "1.2.3.4")

    assert deliver(gate, sessions)[-1] == (noisy_uid, "forward", "sent")
    assert archive.sop_instance_uids(noisy_uid) == noisy_ct
    assert events_of(sessions, noisy_uid, "gate") == ["held", "released"]


# -- 2. re-open and supersede ----------------------------------------------------------------


def test_late_instance_reopens_rescores_and_supersedes(
    settings: Settings,
    sessions: sessionmaker[Session],
    scp: ThreadedAssociationServer,
    archive: Orthanc,
    tmp_path: Path,
) -> None:
    cfg = configure(settings, archive)
    datasets = phantom(4, seed=5)
    uid, study_uid = datasets[0].SeriesInstanceUID, datasets[0].StudyInstanceUID
    files = write_series(datasets, tmp_path / "in")
    arrive(settings, files[:3])
    assert complete(cfg, sessions) == [uid]
    assert score_all(cfg, sessions) == ["scored"]
    deliver(cfg, sessions)
    first = current(sessions, uid)
    assert (first.generation, first.slices_scored) == (0, 3)
    first_objects = report_objects(first)

    arrive(settings, files[3:])  # a late instance
    row = series_row(sessions, uid)
    assert (row.status, row.generation, row.instance_count) == ("receiving", 1, 4)
    assert complete(cfg, sessions) == [uid]
    assert score_all(cfg, sessions) == ["scored"]
    deliver(cfg, sessions)

    second = current(sessions, uid)
    assert second.id != first.id
    assert (second.generation, second.slices_scored) == (1, 4)
    with sessions() as s:
        old = s.get(Result, first.id)
        assert old is not None and old.superseded_by == second.id
        assert len(s.scalars(select(Result).where(Result.series_instance_uid == uid)).all()) == 2

    # The new SR says which SR it replaces.
    assert second.sr_path is not None and second.sr_sop_instance_uid != first.sr_sop_instance_uid
    sr = dcmread(second.sr_path)
    [pred] = sr.PredecessorDocumentsSequence
    assert pred.StudyInstanceUID == study_uid
    [pred_series] = pred.ReferencedSeriesSequence
    assert [i.ReferencedSOPInstanceUID for i in pred_series.ReferencedSOPSequence] == [
        first.sr_sop_instance_uid
    ]
    assert {
        i.ReferencedSOPInstanceUID
        for e in sr.CurrentRequestedProcedureEvidenceSequence
        for se in e.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    } == {d.SOPInstanceUID for d in datasets}
    # Both generations' reports are in the archive; the originals are not (observe).
    assert archived(archive, study_uid) == {**first_objects, **report_objects(second)}

    # `qgate results --series UID --json` shows the new result.
    out = invoke(cli(cfg, tmp_path / "cli"), "results", "--series", uid, "--json")
    assert out.exit_code == 0, out.stderr
    res = strict_json(out.stdout)
    assert (res["status"], res["generation"], res["instances"], res["slices_scored"]) == (
        "scored",
        1,
        4,
        4,
    )
    assert res["scores"] == second.scores
    assert len(res["scores"]["noise"]["slices"]["noise_sigma_hu"]) == 4
    assert res["scores"] != first.scores


def test_series_that_grows_while_scoring_drops_the_stale_output(
    settings: Settings,
    sessions: sessionmaker[Session],
    scp: ThreadedAssociationServer,
    tmp_path: Path,
) -> None:
    cfg = configure(settings)
    datasets = phantom(3, seed=6)
    uid = datasets[0].SeriesInstanceUID
    files = write_series(datasets, tmp_path / "in")
    arrive(settings, files[:2])
    assert complete(cfg, sessions) == [uid]
    with sessions() as s:
        job = claim(s, owner=OWNER, lease_seconds=60, max_attempts=3)
        assert job is not None and job.generation == 0

    arrive(settings, files[2:])  # lands after the claim, before the result is committed
    assert process_job(cfg, sessions, job, build_scorers(cfg), owner=OWNER) == "superseded"
    with sessions() as s:
        assert s.scalars(select(Result)).all() == []
        assert s.scalars(select(OutboxItem)).all() == []
    assert not (cfg.outgoing_dir / uid / f"g0-j{job.id}").exists()
    assert series_row(sessions, uid).generation == 1

    assert complete(cfg, sessions) == [uid]
    assert score_all(cfg, sessions) == ["scored"]
    res = current(sessions, uid)
    assert (res.generation, res.slices_scored) == (1, 3)
    assert [(j.generation, j.state) for j in jobs_of(sessions, uid)] == [(0, "done"), (1, "done")]


# -- 3. failures: parked jobs ----------------------------------------------------------------


def test_unreadable_series_is_parked_at_once_and_reported(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    cfg = configure(settings)
    uid = "1.2.826.0.1.3680043.10.2"
    junk = {f"{uid}.{k}": b"\x00not dicom\xff" * (k + 40) for k in range(1, 4)}
    spool_rows(cfg, sessions, uid, junk)
    assert complete(cfg, sessions) == [uid]
    assert score_all(cfg, sessions) == ["parked"]  # SeriesLoadError: no retry

    [job] = jobs_of(sessions, uid)
    assert (job.state, job.attempts) == ("parked", 1)
    assert job.last_error is not None
    assert job.last_error.startswith("SeriesLoadError: no usable CT instance")
    row = series_row(sessions, uid)
    assert (row.status, row.skip_reason) == ("failed", job.last_error)
    with sessions() as s:
        assert s.scalars(select(OutboxItem)).all() == []
        assert s.scalars(select(Result)).all() == []
    assert not (cfg.outgoing_dir / uid).exists() or not any((cfg.outgoing_dir / uid).iterdir())

    qgate = cli(cfg, tmp_path / "cli")
    parked = strict_json(invoke(qgate, "jobs", "list", "--state", "parked", "--json").stdout)
    assert [(j["id"], j["series_instance_uid"], j["state"]) for j in parked] == [
        (job.id, uid, "parked")
    ]
    assert parked[0]["last_error"] == job.last_error
    res = strict_json(invoke(qgate, "results", "--series", uid, "--json").stdout)
    assert (res["status"], res["decision"], res["scores"]) == ("failed", None, {})
    assert res["reasons"] == [f"scoring failed: {job.last_error}"]


def test_scorer_error_is_retried_then_parked_then_requeued(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    cfg = configure(settings, queue=QueueConfig(max_attempts=2, lease_seconds=30))
    datasets = phantom(3, seed=7)
    uid = datasets[0].SeriesInstanceUID
    files = write_series(datasets, tmp_path / "in")
    spool_rows(
        cfg,
        sessions,
        uid,
        {d.SOPInstanceUID: p.read_bytes() for d, p in zip(datasets, files, strict=True)},
        study_uid=datasets[0].StudyInstanceUID,
    )
    assert complete(cfg, sessions) == [uid]
    boom = cfg.model_copy(
        update={"scoring": cfg.scoring.model_copy(update={"scorers": ["noise", BOOM]})}
    )
    scorers = build_scorers(boom)
    assert [s.name for s in scorers] == ["noise", BOOM]

    assert work_once(boom, sessions, scorers, owner=OWNER) == "queued"
    [job] = jobs_of(sessions, uid)
    assert (job.state, job.attempts) == ("queued", 1)
    assert job.last_error == "RuntimeError: scorer exploded on purpose"
    assert series_row(sessions, uid).status == "queued"  # waiting for its retry

    assert work_once(boom, sessions, scorers, owner=OWNER) == "parked"
    assert work_once(boom, sessions, scorers, owner=OWNER) is None
    [job] = jobs_of(sessions, uid)
    assert (job.state, job.attempts) == ("parked", 2)
    assert job.last_error == "RuntimeError: scorer exploded on purpose"
    row = series_row(sessions, uid)
    assert (row.status, row.skip_reason) == ("failed", job.last_error)
    assert events_of(sessions, uid, "queue").count("queued") == 2  # enqueued, then one retry
    assert events_of(sessions, uid, "queue")[-1] == "parked"
    with sessions() as s:
        assert s.scalars(select(Result)).all() == []

    # Fixed (here: the default scorers), the parked job is requeued and scores.
    out = invoke(cli(cfg, tmp_path / "cli"), "jobs", "retry")
    assert (out.exit_code, out.stdout.strip()) == (0, "requeued 1 job(s)")
    assert series_row(sessions, uid).status == "queued"
    assert score_all(cfg, sessions) == ["scored"]
    assert series_row(sessions, uid).status == "scored"
    assert current(sessions, uid).slices_scored == 3
