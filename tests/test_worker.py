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
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from click.testing import Result as CliResult
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.assemble.completion import queue_complete_series
from qgate.cli import main
from qgate.core.config import (
    ArchiveConfig,
    DispatchConfig,
    GateConfig,
    QueueConfig,
    Settings,
    Threshold,
)
from qgate.core.db.models import (
    AuditEntry,
    Event,
    Instance,
    Job,
    OutboxItem,
    Result,
    Series,
    utcnow,
)
from qgate.core.degrade import PartKind, SkippedPart, SkipReason
from qgate.core.storage import to_local, to_stored
from qgate.decide.gate import ReleaseError, release_series
from qgate.dispatch import run_once
from qgate.receive import start_scp
from qgate.score.pipeline import build_scorers
from qgate.score.queue import claim
from qgate.score.results import list_results
from qgate.score.scorers import ScoreOutput, SeriesVolume, register_scorer
from qgate.score.worker import process_job, work_once
from qgate.synth import make_ct_series, write_series
from qgate.web.crud import WorklistRow, list_series
from qgate.web.schemas import WorklistQuery
from tests.conftest import free_port
from tests.support.dicomfiles import storescu, undecodable_ct_series
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.qgate_proc import QgateProcess

OWNER = "test/worker-0"
LATER = dt.timedelta(hours=1)  # "now" for the assembler: every series looks complete
BOOM = "test-worker-boom"


@register_scorer(BOOM)
class _BoomScorer:
    """A scorer that always raises: skipped, or a retryable failure when it is the only one."""

    name = BOOM
    version = "0"

    def score(self, volume: SeriesVolume) -> ScoreOutput:
        raise RuntimeError("scorer exploded on purpose")


BOOM_ERROR = "RuntimeError: scorer exploded on purpose"


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


def arrive(settings: Settings, files: list[Path], *options: str) -> None:
    """Send ``files`` to the in-process SCP with storescu; every one must be stored.
    ``options``: storescu's, e.g. ``-xs`` to propose the files' JPEG Lossless syntax."""
    out = storescu(settings.dicom.port, files, extra=options)
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


def report_objects(settings: Settings, result: Result) -> dict[str, set[str]]:
    """What the worker wrote for ``result``: SR and SC series -> SOP Instance UIDs."""
    assert result.sr_path is not None
    out: dict[str, set[str]] = {}
    modalities = set()
    for p in to_local(result.sr_path, settings.storage.root).parent.glob("*.dcm"):
        ds = dcmread(p, stop_before_pixels=True)
        out.setdefault(ds.SeriesInstanceUID, set()).add(ds.SOPInstanceUID)
        modalities.add(ds.Modality)
    # The SR series, the quality-map SC series and, with the n2q scorer, the parametric map.
    has_pm = (to_local(result.sr_path, settings.storage.root).parent / "pm.dcm").exists()
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
                    path=to_stored(path, settings.storage.root),
                    size=len(data),
                    instance_number=k + 1,
                    received_at=now,
                )
            )


def spool_datasets(
    settings: Settings, sessions: sessionmaker[Session], datasets: list[Dataset], folder: Path
) -> str:
    """Write ``datasets`` as files and put them in the spool as received; the series UID."""
    files = write_series(datasets, folder)
    uid = str(datasets[0].SeriesInstanceUID)
    spool_rows(
        settings,
        sessions,
        uid,
        {d.SOPInstanceUID: p.read_bytes() for d, p in zip(datasets, files, strict=True)},
        study_uid=datasets[0].StudyInstanceUID,
    )
    return uid


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
    assert archived(archive, observed[0].StudyInstanceUID) == report_objects(settings, res_a)
    assert archive.sop_instance_uids(a_uid) == set()
    # forward: the same, plus every original instance.
    res_b = current(sessions, b_uid)
    assert archived(archive, forwarded[0].StudyInstanceUID) == {
        **report_objects(settings, res_b),
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
    assert noisy_study == report_objects(settings, current(sessions, noisy_uid))  # its results went

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
    first_objects = report_objects(settings, first)

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
    sr = dcmread(to_local(second.sr_path, settings.storage.root))
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
    assert archived(archive, study_uid) == {**first_objects, **report_objects(settings, second)}

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


def test_series_no_scorer_could_measure_is_retried_then_parked_then_requeued(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    cfg = configure(settings, queue=QueueConfig(max_attempts=2, lease_seconds=30))
    datasets = phantom(3, seed=7)
    uid = spool_datasets(cfg, sessions, datasets, tmp_path / "in")
    assert complete(cfg, sessions) == [uid]
    # One failing scorer is skipped (section 4); only a series that no scorer could
    # measure fails, and that failure is retried like any other.
    boom = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"scorers": [BOOM]})})
    scorers = build_scorers(boom)
    error = f"NothingScored: scorer {BOOM} skipped (scorer_error): {BOOM_ERROR}"

    assert work_once(boom, sessions, scorers, owner=OWNER) == "queued"
    [job] = jobs_of(sessions, uid)
    assert (job.state, job.attempts, job.last_error) == ("queued", 1, error)
    assert series_row(sessions, uid).status == "queued"  # waiting for its retry

    assert work_once(boom, sessions, scorers, owner=OWNER) == "parked"
    assert work_once(boom, sessions, scorers, owner=OWNER) is None
    [job] = jobs_of(sessions, uid)
    assert (job.state, job.attempts, job.last_error) == ("parked", 2, error)
    row = series_row(sessions, uid)
    assert (row.status, row.skip_reason, row.held) == ("failed", job.last_error, False)
    assert events_of(sessions, uid, "queue").count("queued") == 2  # enqueued, then one retry
    assert events_of(sessions, uid, "queue")[-1] == "parked"
    assert events_of(sessions, uid, "gate") == []  # observe mode: no originals to send or hold
    with sessions() as s:
        assert s.scalars(select(Result)).all() == []

    # Fixed (here: the default scorers), the parked job is requeued and scores.
    out = invoke(cli(cfg, tmp_path / "cli"), "jobs", "retry")
    assert (out.exit_code, out.stdout.strip()) == (0, "requeued 1 job(s)")
    assert series_row(sessions, uid).status == "queued"
    assert score_all(cfg, sessions) == ["scored"]
    assert series_row(sessions, uid).status == "scored"
    assert current(sessions, uid).slices_scored == 3


# -- 4. nothing held back by a failure; degrade, don't fail ------------------------------------


def worklist(sessions: sessionmaker[Session]) -> dict[str, WorklistRow]:
    """The review app's default worklist (flagged or failed series) by series UID."""
    with sessions() as s:
        rows, _ = list_series(s, query=WorklistQuery(), per_page=100)
    return {r.series.series_instance_uid: r for r in rows}


def audit_of(sessions: sessionmaker[Session], uid: str) -> list[tuple[str, str]]:
    with sessions() as s:
        q = select(AuditEntry).where(AuditEntry.series_instance_uid == uid)
        return [(a.username, a.action) for a in s.scalars(q.order_by(AuditEntry.id))]


def forward_sends(sessions: sessionmaker[Session], uid: str) -> int:
    with sessions() as s:
        q = select(OutboxItem).where(
            OutboxItem.series_instance_uid == uid, OutboxItem.kind == "forward"
        )
        return len(s.scalars(q).all())


def sr_skips(settings: Settings, result: Result) -> tuple[str, list[str]]:
    """(Completion Flag, the SR's "Part of quality report skipped" TEXT items)."""
    assert result.sr_path is not None
    sr = dcmread(to_local(result.sr_path, settings.storage.root))

    def walk(ds: Dataset) -> Iterator[Dataset]:
        for item in ds.get("ContentSequence", []):
            yield item
            yield from walk(item)

    texts = [
        i.TextValue
        for i in walk(sr)
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "SKIPPED"
    ]
    return str(sr.CompletionFlag), texts


def skipped_parts(result: Result) -> list[SkippedPart]:
    return [SkippedPart.from_json(p) for p in result.skipped_parts]


@pytest.mark.parametrize("mode", ["forward", "gate"])
def test_undecodable_series_is_sent_or_held_never_stuck(
    mode: str,
    settings: Settings,
    sessions: sessionmaker[Session],
    scp: ThreadedAssociationServer,
    archive: Orthanc,
    tmp_path: Path,
) -> None:
    cfg = configure(settings, archive, gate=GateConfig(mode=mode))  # on_failure: the default
    datasets = undecodable_ct_series(3, seed=11)
    uid, originals = datasets[0].SeriesInstanceUID, {d.SOPInstanceUID for d in datasets}
    arrive(settings, write_series(datasets, tmp_path / "in"), "-xs")
    assert complete(cfg, sessions) == [uid]
    assert score_all(cfg, sessions) == ["parked"]  # nothing to decode: no retry
    [job] = jobs_of(sessions, uid)
    assert job.last_error is not None
    assert job.last_error.startswith("SeriesLoadError: no CT slice could be decoded")
    row = series_row(sessions, uid)
    assert row.status == "failed"

    # On the default worklist with its error, and in `qgate results`.
    item = worklist(sessions)[uid]
    assert item.result is None and item.series.skip_reason == job.last_error
    qgate = cli(cfg, tmp_path / "cli")
    res = strict_json(invoke(qgate, "results", "--series", uid, "--json").stdout)
    assert (res["status"], res["held"]) == ("failed", mode == "gate")
    assert res["reasons"] == [f"scoring failed: {job.last_error}"]

    if mode == "forward":  # fail open: the originals go to the archive unscored
        assert not row.held
        assert events_of(sessions, uid, "gate") == ["forwarded_unscored"]
        assert deliver(cfg, sessions) == [(uid, "forward", "sent")]
        assert archive.sop_instance_uids(uid) == originals
        refused = invoke(qgate, "release", uid)
        assert refused.exit_code == 1 and f"series {uid} is not held" in refused.stderr
    else:  # fail closed: held back until a person releases it
        assert row.held
        assert events_of(sessions, uid, "gate") == ["held"]
        run_once(cfg, sessions, owner="test/dispatch")
        assert archive.sop_instance_uids(uid) == set()
        out = invoke(qgate, "release", uid)
        assert out.exit_code == 0, out.stderr
        assert f"released {uid}: 3 instance(s) queued" in out.stdout
        assert events_of(sessions, uid, "gate") == ["held", "released"]
        assert deliver(cfg, sessions) == [(uid, "forward", "sent")]
        assert archive.sop_instance_uids(uid) == originals

    # Rescored from the command line: the parked job is requeued once, and when it fails
    # again the originals, already sent, are neither sent again nor held.
    out = invoke(qgate, "rescore", uid)
    assert (out.exit_code, out.stdout.strip()) == (0, f"rescore {uid}: job {job.id} queued")
    again = invoke(qgate, "rescore", uid)
    assert again.exit_code == 1 and f"already queued for scoring (job {job.id})" in again.stderr
    assert score_all(cfg, sessions) == ["parked"]
    row = series_row(sessions, uid)
    assert (row.status, row.held, forward_sends(sessions, uid)) == ("failed", False, 1)
    assert "rescore" in events_of(sessions, uid, "queue")
    released = [("cli", "release")] if mode == "gate" else []
    assert audit_of(sessions, uid) == [*released, ("cli", "rescore")]


def test_hold_in_forward_mode_and_resubmit_after_an_archive_outage(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """gate.on_failure overrides the mode's default; dead sends are resubmitted per series."""
    port = free_port()  # no archive listens here yet
    cfg = configure(settings, gate=GateConfig(mode="forward", on_failure="hold")).model_copy(
        update={"archive": ArchiveConfig(ae_title="ARCHIVE", host="127.0.0.1", port=port)}
    )
    cfg = cfg.model_copy(update={"dispatch": DispatchConfig(max_attempts=1, poll_seconds=0.1)})
    datasets = undecodable_ct_series(2, seed=12)
    uid = spool_datasets(cfg, sessions, datasets, tmp_path / "in")
    assert complete(cfg, sessions) == [uid]
    assert score_all(cfg, sessions) == ["parked"]
    assert series_row(sessions, uid).held
    assert events_of(sessions, uid, "gate") == ["held"]

    qgate = cli(cfg, tmp_path / "cli")
    nothing = invoke(qgate, "resubmit", uid)
    assert nothing.exit_code == 1 and "no dead-lettered send" in nothing.stderr
    assert invoke(qgate, "release", uid).exit_code == 0
    run_once(cfg, sessions, owner="test/dispatch")  # the archive is down: a dead letter
    with sessions() as s:
        [send] = s.scalars(select(OutboxItem).where(OutboxItem.series_instance_uid == uid))
        assert (send.kind, send.state) == ("forward", "dead")

    with start_orthanc(tmp_path / "orthanc", dicom_port=port, http_port=free_port()) as archive:
        out = invoke(qgate, "resubmit", uid)
        assert (out.exit_code, out.stdout.strip()) == (0, f"resubmitted 1 send(s) of {uid}")
        assert deliver(cfg, sessions) == [(uid, "forward", "sent")]
        assert archive.sop_instance_uids(uid) == {d.SOPInstanceUID for d in datasets}
        archive.stop(kill=True)
    assert audit_of(sessions, uid) == [("cli", "release"), ("cli", "resubmit")]
    assert events_of(sessions, uid, "dispatch")[-3:] == ["resubmitted", "claimed", "sent"]

    # Once retention has deleted the originals there is nothing left to score.
    with sessions.begin() as s:
        s.get(Series, uid).originals_purged_at = utcnow()  # type: ignore[union-attr]
    gone = invoke(qgate, "rescore", uid)
    assert gone.exit_code == 1 and "retention deleted its originals" in gone.stderr


@pytest.mark.parametrize("mode", ["forward", "gate"])
def test_failing_scorer_is_skipped_and_the_series_still_goes_out(
    mode: str,
    settings: Settings,
    sessions: sessionmaker[Session],
    scp: ThreadedAssociationServer,
    archive: Orthanc,
    tmp_path: Path,
) -> None:
    # A limit on the failing scorer's output: the gate cannot measure it, so it flags.
    gate = GateConfig(
        mode=mode,
        thresholds=[*GateConfig().thresholds, Threshold(scorer=BOOM, output="score", min=1)],
    )
    cfg = configure(settings, archive, gate=gate)
    cfg = cfg.model_copy(
        update={"scoring": cfg.scoring.model_copy(update={"scorers": ["noise", "snr", BOOM]})}
    )
    datasets = phantom(3, seed=13)
    uid, originals = datasets[0].SeriesInstanceUID, {d.SOPInstanceUID for d in datasets}
    arrive(settings, write_series(datasets, tmp_path / "in"))
    assert complete(cfg, sessions) == [uid]
    assert score_all(cfg, sessions) == ["scored"]  # first try: a skip is not a failure

    res = current(sessions, uid)
    skipped = SkippedPart(PartKind.SCORER, BOOM, SkipReason.SCORER_ERROR, BOOM_ERROR)
    assert skipped_parts(res) == [skipped]
    assert set(res.scores) == {"noise", "snr"} and res.decision == "flag"
    assert f"{BOOM}: output score missing (scorer did not run)" in res.reasons
    assert sr_skips(settings, res) == ("PARTIAL", [skipped.describe()])
    assert events_of(sessions, uid, "score")[-2:] == ["part_skipped", "scored"]
    assert uid in worklist(sessions)  # flagged: on the default worklist

    deliver(cfg, sessions)
    reports = report_objects(settings, res)
    if mode == "forward":
        assert archived(archive, datasets[0].StudyInstanceUID) == {**reports, uid: originals}
    else:  # flagged in gate mode: held, and released from the command line
        assert archived(archive, datasets[0].StudyInstanceUID) == reports
        assert series_row(sessions, uid).held
        out = invoke(cli(cfg, tmp_path / "cli"), "release", uid)
        assert out.exit_code == 0, out.stderr
        assert deliver(cfg, sessions)[-1] == (uid, "forward", "sent")
        assert archive.sop_instance_uids(uid) == originals
    res_json = strict_json(invoke(cli(cfg, tmp_path / "cli2"), "results", "--json").stdout)
    assert res_json[0]["skipped_parts"] == [skipped.to_json()]


def test_small_matrix_and_missing_frame_of_reference_still_get_an_sr(
    settings: Settings,
    sessions: sessionmaker[Session],
    scp: ThreadedAssociationServer,
    tmp_path: Path,
) -> None:
    """Real files from pydicom's test set, with the five default scorers."""
    cfg = configure(settings)
    small = Path(get_testdata_file("CT_small.dcm"))  # 128 x 128
    no_for = Path(get_testdata_file("693_J2KI.dcm"))  # JPEG 2000, no Frame of Reference UID
    headers = {p: dcmread(p, stop_before_pixels=True) for p in (small, no_for)}
    assert (headers[small].Rows, headers[small].Columns) == (128, 128)
    assert "FrameOfReferenceUID" not in headers[no_for]
    # A 16 x 16 CT, which Noise2Quality's U-Net cannot take (its InstanceNorm raises).
    tiny = write_series(make_ct_series(3, 16, 16, seed=14), tmp_path / "tiny")
    arrive(settings, [small, *tiny])
    arrive(settings, [no_for], "-xw")  # proposes its JPEG 2000 syntax
    uids = {p: str(h.SeriesInstanceUID) for p, h in headers.items()}
    tiny_uid = str(dcmread(tiny[0], stop_before_pixels=True).SeriesInstanceUID)
    assert sorted(complete(cfg, sessions)) == sorted([*uids.values(), tiny_uid])
    assert score_all(cfg, sessions) == ["scored"] * 3

    for uid in [*uids.values(), tiny_uid]:
        res = current(sessions, uid)
        flag, texts = sr_skips(settings, res)
        parts = skipped_parts(res)
        assert texts == [p.describe() for p in parts]  # the SR says what was skipped
        assert flag == ("PARTIAL" if parts else "COMPLETE")
        # Valid, but for what it copies from a source that lacks it (the CQ500 file's
        # PatientIdentityRemoved without DeidentificationMethod).
        source = next((f for f, u in uids.items() if u == uid), tiny[0])
        sr_file = to_local(res.sr_path or "", settings.storage.root)
        assert set(dciodvfy_errors(sr_file)) <= set(dciodvfy_errors(source))

    # No Frame of Reference: no Parametric Map, said so; the SC series still goes.
    res = current(sessions, uids[no_for])
    assert [(p.kind, p.name, p.reason) for p in skipped_parts(res)] == [
        (PartKind.OUTPUT, "parametric_map", SkipReason.NO_FRAME_OF_REFERENCE)
    ]
    folder = to_local(res.sr_path or "", settings.storage.root).parent
    assert sorted(p.name for p in folder.iterdir()) == ["sc00000.dcm", "sr.dcm"]
    assert set(res.scores) == {"noise", "snr", "mdiqa", "n2q", "chestiqa"}
    # 128 x 128: every scorer and every object.
    res = current(sessions, uids[small])
    assert skipped_parts(res) == []
    assert (to_local(res.sr_path or "", settings.storage.root).parent / "pm.dcm").exists()
    # 16 x 16: Noise2Quality skipped with the model's own error; the others still count.
    res = current(sessions, tiny_uid)
    [part] = skipped_parts(res)
    assert (part.kind, part.name, part.reason) == (
        PartKind.SCORER,
        "n2q",
        SkipReason.SCORER_ERROR,
    )
    assert "spatial element" in part.detail
    assert {"noise", "snr", "mdiqa", "chestiqa"} == set(res.scores)


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
