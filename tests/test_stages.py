"""Stages as processes: ``qgate serve`` supervises them; several nodes share PostgreSQL.

Real peers only: storescu sends, the Debian Orthanc is the archive, every stage is a
``qgate`` subprocess. The classical scorers (noise, snr) keep these runs free of torch
models. The multi-node tests give each process its own ``node_name`` and its own mount
point of the shared storage root (a symlink to one folder), as separate machines would.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from qgate.core.db import Event, Job, OutboxItem, Result, make_engine
from qgate.synth import make_ct_series, write_series
from tests.conftest import free_port
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.postgres import create_database
from tests.support.qgate_proc import QgateProcess

pytestmark = [pytest.mark.slow]


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Orthanc]:
    with start_orthanc(tmp_path / "orthanc", dicom_port=free_port(), http_port=free_port()) as a:
        yield a


def _config(
    db_url: str, root: Path, archive: Orthanc, port: int, **over: dict[str, Any]
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "dicom": {"ae_title": "QGATE", "host": "127.0.0.1", "port": port},
        "archive": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.dicom_port},
        "series": {"stable_seconds": 30, "release_grace_seconds": 0.5, "poll_seconds": 0.2},
        "database": {"url": db_url},
        "storage": {"root": str(root), "fsync": False, "min_free_mb": 0},
        "queue": {"poll_seconds": 0.2},
        "dispatch": {"backoff_initial_seconds": 0.5, "backoff_max_seconds": 2, "poll_seconds": 0.2},
        "gate": {"mode": "observe"},
        "scoring": {"scorers": ["noise", "snr"]},
        "retrain": {"enabled": False},
        "retention": {"enabled": False},
    }
    for key, val in over.items():
        cfg[key] = {**cfg.get(key, {}), **val} if isinstance(val, dict) else val
    return cfg


def _children(pid: int) -> dict[str, int]:
    """The supervisor's children: stage name (the last argument) -> pid."""
    out: dict[str, int] = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:  # exited meanwhile
            continue
        if len(argv) >= 2:  # a zombie (exited, not yet reaped) has no command line
            out[argv[-2].decode()] = int(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}")


def _sent(engine: Engine, series_uids: list[str]) -> bool:
    """Every series has a result and every one of its sends was delivered."""
    with engine.connect() as c:
        scored = c.scalar(
            select(func.count(func.distinct(Result.series_instance_uid))).where(
                Result.series_instance_uid.in_(series_uids)
            )
        )
        unsent = c.scalar(
            select(func.count(OutboxItem.id)).where(
                OutboxItem.series_instance_uid.in_(series_uids), OutboxItem.state != "sent"
            )
        )
    return scored == len(series_uids) and unsent == 0


def test_serve_runs_each_stage_as_a_process_and_restarts_a_killed_one(
    tmp_path: Path, archive: Orthanc
) -> None:
    db_url = f"sqlite:///{tmp_path / 'qgate.db'}"
    cfg = _config(
        db_url,
        tmp_path / "var",
        archive,
        free_port(),
        web={"enabled": True, "port": free_port()},
        node_name="solo",
    )
    q = QgateProcess(tmp_path / "serve", cfg).start()
    assert q.proc is not None
    serve = q.proc.pid
    try:
        stages = _wait(
            lambda: (c := _children(serve)) and len(c) == 4 and c, 60, "four stage processes"
        )
        assert set(stages) == {"receive", "worker", "dispatch", "web"}

        os.kill(stages["worker"], signal.SIGKILL)
        restarted = _wait(
            lambda: (w := _children(serve).get("worker")) not in (None, stages["worker"]) and w,
            60,
            "the worker restarted",
        )
        killed = f"stage worker (pid {stages['worker']}) exited unasked (killed by SIGKILL)"
        assert killed in q.log()

        datasets = make_ct_series(4, 64, 64, noise_hu=15.0, seed=11)
        uid = datasets[0].SeriesInstanceUID
        sent = q.storescu(write_series(datasets, tmp_path / "in"))
        assert sent.returncode == 0, sent.stderr
        engine = make_engine(db_url)
        try:
            _wait(lambda: _sent(engine, [uid]), 120, "the series scored and sent")
            with engine.connect() as c:
                claims = c.execute(
                    select(Event.node, Event.detail).where(
                        Event.series_instance_uid == uid, Event.event == "claimed"
                    )
                ).all()
        finally:
            engine.dispose()
        assert [n for n, _ in claims] == ["solo", "solo"]  # the job, then the outbox item
        assert any("solo/worker-0.0" in (d or "") for _, d in claims)
        assert _children(serve)["worker"] == restarted  # the new worker did it
    finally:
        q.stop()
    assert q.proc.returncode == 0
    assert not any(_alive(pid) for pid in (*stages.values(), restarted))


def _node(
    tmp_path: Path, name: str, command: str, shared: Path, cfg: dict[str, Any]
) -> QgateProcess:
    """One ``qgate <command>`` as node ``name``, with its own mount of the shared root."""
    mount = tmp_path / f"mnt-{name}"
    mount.symlink_to(shared, target_is_directory=True)
    node_cfg = {**cfg, "node_name": name, "storage": {**cfg["storage"], "root": str(mount)}}
    return QgateProcess(tmp_path / name, node_cfg, command=[command])


def _cluster(tmp_path: Path, cfg: dict[str, Any]) -> list[QgateProcess]:
    """Receiver, two workers and a dispatcher, each as its own node, on a migrated store."""
    shared = Path(cfg["storage"]["root"])
    shared.mkdir()
    procs = [
        _node(tmp_path, name, command, shared, cfg)
        for name, command in (
            ("node-r", "receive"),
            ("node-a", "worker"),
            ("node-b", "worker"),
            ("node-d", "dispatch"),
        )
    ]
    procs[0].cli("db", "upgrade")
    return procs


@pytest.fixture
def pg_url(pg_base_url: str) -> str:
    return create_database(pg_base_url)


@pytest.mark.postgres
def test_one_receiver_two_workers_one_dispatcher_score_every_series_once(
    tmp_path: Path, pg_url: str, archive: Orthanc
) -> None:
    procs = _cluster(tmp_path, _config(pg_url, tmp_path / "shared", archive, free_port()))
    receiver = procs[0]
    series = [make_ct_series(4, 64, 64, noise_hu=10.0 + 3 * k, seed=20 + k) for k in range(8)]
    uids = [s[0].SeriesInstanceUID for s in series]
    files = [f for k, s in enumerate(series) for f in write_series(s, tmp_path / "in" / str(k))]
    engine = make_engine(pg_url)
    try:
        for p in procs:
            p.start()
        sent = receiver.storescu(files)
        assert sent.returncode == 0, sent.stderr
        _wait(lambda: _sent(engine, uids), 180, "every series scored and sent")
        with engine.connect() as c:
            results = c.execute(
                select(Result.series_instance_uid, func.count()).group_by(
                    Result.series_instance_uid
                )
            ).all()
            jobs = c.execute(select(Job.state, Job.attempts)).all()
            nodes = dict(
                c.execute(
                    select(Event.stage, func.array_agg(func.distinct(Event.node)))
                    .where(Event.event.not_in(("enqueued", "queued")))  # by the stage before
                    .group_by(Event.stage)
                ).all()
            )
            stored = c.scalars(select(OutboxItem.paths)).all()
    finally:
        for p in procs:
            p.stop()
        engine.dispose()
    assert sorted(results) == sorted((u, 1) for u in uids)  # each series scored once
    assert jobs == [("done", 1)] * len(uids)  # each job claimed once
    assert set(nodes["receive"]) == set(nodes["assemble"]) == {"node-r"}
    assert set(nodes["score"]) | set(nodes["queue"]) <= {"node-a", "node-b"}
    assert set(nodes["dispatch"]) == {"node-d"}
    # Stored paths are relative to the storage root: each node resolves its own mount.
    assert all(not os.path.isabs(p) for paths in stored for p in paths)
    assert len(archive.get("/instances")) == len(uids) * (1 + 4)  # one SR + 4 SC each


@pytest.mark.postgres
def test_kill_9_of_a_worker_mid_job_loses_nothing(
    tmp_path: Path, pg_url: str, archive: Orthanc
) -> None:
    cfg = _config(pg_url, tmp_path / "shared", archive, free_port(), queue={"lease_seconds": 4})
    receiver, first, second, dispatcher = _cluster(tmp_path, cfg)
    # Large enough that scoring and its 64 quality maps take seconds.
    datasets = make_ct_series(64, 512, 512, noise_hu=20.0, seed=31)
    uid = datasets[0].SeriesInstanceUID
    engine = make_engine(pg_url)

    def holder() -> str | None:
        """The lease owner of the series' job while it is running."""
        with engine.connect() as c:
            row = c.execute(
                select(Job.state, Job.lease_owner).where(Job.series_instance_uid == uid)
            ).first()
        return row.lease_owner if row is not None and row.state == "running" else None

    workers = {"node-a/worker-0.0": first, "node-b/worker-0.0": second}
    try:
        for p in (receiver, first, second, dispatcher):
            p.start()
        sent = receiver.storescu(write_series(datasets, tmp_path / "in"))
        assert sent.returncode == 0, sent.stderr
        owner = _wait(holder, 120, "a worker scoring the series")
        victim = workers.pop(owner)
        victim.stop(kill=True)  # mid-job: its lease is still running
        (survivor,) = workers
        _wait(lambda: _sent(engine, [uid]), 180, "the series scored by the other worker")
        with engine.connect() as c:
            job = c.execute(select(Job.state, Job.attempts, Job.lease_owner)).all()
            results = c.scalar(select(func.count(Result.id)))
            claims = c.execute(
                select(Event.node, Event.detail)
                .where(Event.stage == "queue", Event.event == "claimed")
                .order_by(Event.id)
            ).all()
    finally:
        for p in (receiver, first, second, dispatcher):
            p.stop()
        engine.dispose()
    assert victim.proc is not None and victim.proc.returncode == -signal.SIGKILL
    assert job == [("done", 2, None)] and results == 1
    assert [n for n, _ in claims] == [owner.split("/")[0], survivor.split("/")[0]]
    assert f"by {survivor}, attempt 2" in (claims[1][1] or "")
    # Nothing lost, nothing twice: the archive has the one SR and its quality maps.
    stats = archive.get("/statistics")
    assert stats["CountSeries"] == 2
