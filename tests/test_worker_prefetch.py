"""The worker that decodes ahead: every job scored once, nothing lost on stop or kill -9.

On SQLite and PostgreSQL (the ``settings`` / ``db_url`` fixtures), with the classical
scorers, so the runs hold no torch models. The kill test runs ``qgate worker`` as real
processes.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from qgate.assemble.completion import queue_complete_series
from qgate.core.config import QueueConfig, ScoringConfig, Settings, load_settings
from qgate.core.db import Event, Job, Result, make_engine, make_session_factory
from qgate.core.db.models import Series, utcnow
from qgate.score.prefetch import Prefetcher, SeriesDecoder
from qgate.score.queue import claim, count_attempt, enqueue_score, set_aside
from qgate.score.stage import WorkerStage
from qgate.score.volume import SeriesLoadError, load_series
from qgate.score.worker import ServingModels, Worker
from qgate.synth import make_ct_series, write_series
from tests.conftest import free_port
from tests.support.qgate_proc import QgateProcess
from tests.support.web import spool_series

LATER = dt.timedelta(days=1)


def _fast(settings: Settings, **queue: Any) -> Settings:
    return settings.model_copy(
        update={
            "scoring": ScoringConfig(scorers=["noise", "snr"]),
            "queue": QueueConfig(**{"poll_seconds": 0.05, **queue}),
        }
    )


def _queue_series(
    settings: Settings, sessions: sessionmaker[Session], count: int, **kw: Any
) -> list[str]:
    uids = [
        spool_series(settings, sessions, seed=40 + k, patient_id=f"P{k}", **kw)
        for k in range(count)
    ]
    queue_complete_series(sessions, settings.series, now=utcnow() + LATER)
    return uids


def _wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := predicate():
            return got
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def _starts(statement: str, prefix: str) -> bool:
    return statement.lstrip().upper().startswith(prefix.upper())


def _states(sessions: sessionmaker[Session]) -> list[tuple[str, str, int]]:
    with sessions() as s:
        rows = s.execute(select(Job.series_instance_uid, Job.state, Job.attempts)).all()
    return [(u, st, a) for u, st, a in rows]


def _results(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as s:
        rows = s.execute(
            select(Result.series_instance_uid, func.count()).group_by(Result.series_instance_uid)
        ).all()
    return {u: n for u, n in rows}


def test_prefetcher_claims_at_most_depth_ahead_and_returns_the_rest_on_close() -> None:
    items = iter(range(10))
    claimed: list[int] = []

    def source() -> int | None:
        i = next(items, None)
        if i is not None:
            claimed.append(i)
        return i

    ahead = Prefetcher(source, lambda i: i * 10, depth=2, poll_seconds=0.01, name="t").start()
    taken = ahead.get(timeout=5)
    _wait(lambda: len(claimed) == 3, 5, "two claimed ahead of the one taken")
    time.sleep(0.2)
    assert len(claimed) == 3  # never more than depth ahead
    left = ahead.close()
    assert taken is not None and sorted([taken, *left]) == [10 * i for i in claimed]


def test_an_idle_prefetcher_polls_once_per_interval_and_takes_a_burst_at_once() -> None:
    """Four claim threads on an empty source ask it once per poll between them (not four
    times), and once work comes, every item is claimed at once, not one per poll."""
    todo: list[int] = []
    calls: list[float] = []
    lock = threading.Lock()

    def source() -> int | None:
        with lock:
            calls.append(time.monotonic())
            return todo.pop(0) if todo else None

    poll = 0.2
    ahead = Prefetcher(source, lambda i: i, depth=4, poll_seconds=poll, name="idle").start()
    try:
        time.sleep(1.0)  # the backoff reaches the poll interval
        before = len(calls)
        time.sleep(2.0)
        idle_calls = len(calls) - before
        # One claim per 0.2 s for the whole prefetcher (10); 4 threads polling alone: 40.
        assert idle_calls <= 12, idle_calls
        with lock:
            todo.extend(range(4))
            queued = time.monotonic()
        got = [ahead.get(timeout=5) for _ in range(4)]
        taken = time.monotonic() - queued
    finally:
        ahead.close()
    assert sorted(g for g in got if g is not None) == [0, 1, 2, 3]
    assert taken < poll + 0.5, taken  # the first within one poll, the others with it


def test_an_idle_worker_process_claims_once_per_poll_and_picks_up_work(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """``qgate worker`` with two threads, three series ahead each, on an empty queue: one
    claim per ``queue.poll_seconds`` for the process (it made 8 claims and 2 registry
    reads per poll before), and no longer waits than that (a backoff past the poll would
    make 2 claims in the window); a series queued then is taken by the next claim.

    Counted in statements, not seconds: on a loaded 2-core CI host the wall clock of a
    pick-up says more about the scheduler than about the poll."""
    poll = 0.2
    cfg = _fast(settings, prefetch=3, workers=2, poll_seconds=poll)
    cfg.retrain.enabled = cfg.retention.enabled = False
    main = threading.get_ident()
    lock = threading.Lock()
    worker_sql: list[str] = []  # statements from the worker's threads, in order

    def trace(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if threading.get_ident() != main:
            with lock:
                worker_sql.append(statement)

    def claims(trail: list[str]) -> list[str]:
        return [st for st in trail if _starts(st, "SELECT") and "FROM jobs" in st]

    stage = WorkerStage(cfg)
    stage.start()
    sqlalchemy.event.listen(Engine, "before_cursor_execute", trace)
    try:
        time.sleep(1.5)  # started, and backed off to the poll interval
        with lock:
            worker_sql.clear()
        time.sleep(2.0)
        with lock:
            idle = list(worker_sql)
        # 2 s / 0.2 s = 10 claims, one SELECT each; before: 2 x (3 + 1) per poll = 80.
        assert len(idle) <= 13, idle
        assert len(claims(idle)) >= 4, idle
        uid = _queue_series(cfg, sessions, 1, n=4, size=64)[0]
        with lock:
            queued = len(worker_sql)  # statements after this began once the job was visible
        _wait(
            lambda: any(st != "queued" for u, st, _ in _states(sessions) if u == uid),
            10,
            "the series claimed",
        )
        with lock:
            after = worker_sql[queued:]
        sqlalchemy.event.remove(Engine, "before_cursor_execute", trace)
        won = next(i for i, st in enumerate(after) if _starts(st, "UPDATE jobs"))
        assert len(claims(after[:won])) == 1, after[: won + 1]  # the first look took it
        _wait(lambda: _results(sessions), 60, "the series scored")
    finally:
        if sqlalchemy.event.contains(Engine, "before_cursor_execute", trace):
            sqlalchemy.event.remove(Engine, "before_cursor_execute", trace)
        stage.stop()


def test_a_job_that_only_waited_is_not_parked_for_its_workers_crashes(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as s:
        s.add(Series(series_instance_uid="1.2.3.9", study_instance_uid="1.2.3", status="queued"))
        enqueue_score(s, series_uid="1.2.3.9", generation=0)
    for k in range(4):  # more crashes than max_attempts
        with sessions() as s:
            job = claim(s, owner=f"w{k}", lease_seconds=0.05, max_attempts=2)
        assert job is not None and job.attempts == 1 and job.state == "running"
        with sessions() as s:
            assert set_aside(s, job, owner=f"w{k}")
        time.sleep(0.1)  # its worker dies while the job waits: the lease lapses
    with sessions() as s:
        assert not count_attempt(s, job, owner="w2")  # another worker's now
        job = claim(s, owner="last", lease_seconds=60, max_attempts=2)
    assert job is not None and job.attempts == 1  # not parked: it never ran
    assert _states(sessions) == [("1.2.3.9", "running", 1)]


@pytest.mark.parametrize("processes", [0, 2])
def test_series_decoder_gives_what_load_series_gives(tmp_path: Path, processes: int) -> None:
    paths = write_series(make_ct_series(5, 64, 48, seed=3), tmp_path / "s")
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    decoder = SeriesDecoder(processes=processes)
    try:
        got = decoder([*paths, tmp_path / "junk.dcm"])
        want = load_series([*paths, tmp_path / "junk.dcm"])
        with pytest.raises(SeriesLoadError) as err:
            decoder([tmp_path / "junk.dcm"])
    finally:
        decoder.close()
    assert np.array_equal(got.volume.hu, want.volume.hu) and got.volume.hu.flags.c_contiguous
    for name in ("slice_positions", "sop_instance_uids", "pixel_spacing", "acquisition"):
        assert getattr(got.volume, name) == getattr(want.volume, name)
    assert got.skipped == want.skipped
    assert [h.SOPInstanceUID for h in got.headers] == [h.SOPInstanceUID for h in want.headers]
    # The reasons cross back from a decoder process too.
    assert err.value.skipped == [
        (tmp_path / "junk.dcm", "not a readable DICOM file (InvalidDicomError)")
    ]


def test_prefetching_workers_score_every_job_exactly_once(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    # A short lease (renewed every 4/3 s), so leases are renewed while jobs wait decoded.
    cfg = _fast(settings, prefetch=2, lease_seconds=4)
    uids = _queue_series(cfg, sessions, 8, n=4, size=96)
    models = ServingModels(cfg, sessions, owner="test/prefetch")
    workers = [Worker(cfg, sessions, owner=f"test/w{i}", models=models) for i in range(2)]
    for w in workers:
        w.start()
    try:
        _wait(lambda: len(_results(sessions)) == len(uids), 120, "every series scored")
        time.sleep(0.5)  # a second chance for anything to be scored twice
    finally:
        for w in workers:
            w.stop()
        for w in workers:
            w.join(timeout=60)
    assert _results(sessions) == {u: 1 for u in uids}
    assert sorted(_states(sessions)) == sorted((u, "done", 1) for u in uids)
    with sessions() as s:
        claims = s.scalars(
            select(Event.series_instance_uid).where(
                Event.stage == "queue", Event.event == "claimed"
            )
        ).all()
        lapsed = s.scalar(
            select(func.count()).where(Event.stage == "queue", Event.event == "requeued")
        )
    assert sorted(claims) == sorted(uids) and lapsed == 0


def test_stop_puts_back_the_jobs_decoded_ahead(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    cfg = _fast(settings, prefetch=3)
    uids = _queue_series(cfg, sessions, 6, n=16, size=256)
    worker = Worker(cfg, sessions, owner="test/stopping")
    worker.start()
    try:
        _wait(lambda: _results(sessions), 120, "a first series scored")
    finally:
        worker.stop()
        worker.join(timeout=120)
    assert not worker.is_alive()
    states = _states(sessions)
    done = [u for u, st, _ in states if st == "done"]
    assert done and all(st in ("done", "queued") for _, st, _ in states)
    # The jobs put back carry no attempt: they only waited.
    assert all(a == (1 if st == "done" else 0) for _, st, a in states)
    # Another worker scores the rest, each once.
    again = Worker(cfg, sessions, owner="test/after")
    again.start()
    try:
        _wait(lambda: len(_results(sessions)) == len(uids), 120, "the rest scored")
    finally:
        again.stop()
        again.join(timeout=120)
    assert _results(sessions) == {u: 1 for u in uids}


@pytest.mark.slow
def test_kill_9_with_a_job_decoded_ahead_loses_nothing(tmp_path: Path, db_url: str) -> None:
    root = tmp_path / "var"
    cfg: dict[str, Any] = {
        "dicom": {"port": free_port(), "host": "127.0.0.1"},
        "database": {"url": db_url},
        "storage": {"root": str(root), "fsync": False, "min_free_mb": 0},
        "queue": {"lease_seconds": 3, "poll_seconds": 0.1, "prefetch": 1},
        "scoring": {"scorers": ["noise", "snr"]},
        "retrain": {"enabled": False},
        "retention": {"enabled": False},
    }
    first = QgateProcess(tmp_path / "a", {**cfg, "node_name": "node-a"}, command=["worker"])
    second = QgateProcess(tmp_path / "b", {**cfg, "node_name": "node-b"}, command=["worker"])
    first.cli("db", "upgrade")
    settings = load_settings(path=None, **{k: cfg[k] for k in ("database", "storage")})
    engine = make_engine(db_url)
    sessions = make_session_factory(engine, node="test")
    try:
        # Large enough that scoring one (and its 64 quality maps) takes seconds.
        uids = _queue_series(settings, sessions, 2, n=64, size=512)

        def scoring_one_with_the_other_aside() -> tuple[str, str] | None:
            with sessions() as s:
                started = set(
                    s.scalars(
                        select(Event.series_instance_uid).where(
                            Event.stage == "score", Event.event == "started"
                        )
                    )
                )
                waiting = s.scalars(
                    select(Job.series_instance_uid).where(Job.state == "running", Job.attempts == 0)
                ).all()
            if len(started) == 1 and len(waiting) == 1 and waiting[0] not in started:
                return next(iter(started)), waiting[0]
            return None

        first.start()
        scoring, aside = _wait(scoring_one_with_the_other_aside, 120, "one scoring, one aside")
        assert not _results(sessions)
        first.stop(kill=True)
        second.start()
        _wait(lambda: len(_results(sessions)) == 2, 180, "both scored by the other worker")
        with sessions() as s:
            claims = s.execute(
                select(Event.series_instance_uid, Event.node)
                .where(Event.stage == "queue", Event.event == "claimed")
                .order_by(Event.id)
            ).all()
        jobs = {u: (st, a) for u, st, a in _states(sessions)}
    finally:
        first.stop(kill=True)
        second.stop()
        engine.dispose()
    assert first.proc is not None and first.proc.returncode == -9
    assert _results(sessions) == {u: 1 for u in uids}
    # Killed mid-scoring: two attempts. Killed while it waited decoded: one, the other
    # node's.
    assert jobs == {scoring: ("done", 2), aside: ("done", 1)}
    assert sorted((u, n) for u, n in claims) == sorted(
        [(scoring, "node-a"), (aside, "node-a"), (scoring, "node-b"), (aside, "node-b")]
    )
