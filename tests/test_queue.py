"""The durable scoring queue and series completion, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.assemble.completion import queue_complete_series
from qgate.core.config import Settings
from qgate.core.db.models import Event, Job, Series, utcnow
from qgate.score.queue import (
    claim,
    enqueue_score,
    fail,
    finish,
    list_jobs,
    release_owner,
    retry_parked,
)

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def _series(sessions: sessionmaker[Session], uid: str, **kw: object) -> None:
    with sessions.begin() as s:
        s.add(Series(series_instance_uid=uid, study_instance_uid="1.2.3", **kw))


def _job(sessions: sessionmaker[Session], uid: str = "1.2.3.4") -> int:
    with sessions.begin() as s:
        if s.get(Series, uid) is None:
            s.add(Series(series_instance_uid=uid, study_instance_uid="1.2.3", status="queued"))
        job = enqueue_score(s, series_uid=uid, generation=0)
        s.flush()
        return job.id


def test_each_job_goes_to_exactly_one_of_many_workers(sessions: sessionmaker[Session]) -> None:
    ids = {_job(sessions, f"1.2.3.{i}") for i in range(12)}
    got: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while True:
            with sessions() as s:
                job = claim(s, owner=name, lease_seconds=60, max_attempts=3)
            if job is None:
                return
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(ids)


def test_lapsed_lease_returns_the_job(sessions: sessionmaker[Session]) -> None:
    jid = _job(sessions)
    with sessions() as s:
        assert claim(s, owner="a", lease_seconds=10, max_attempts=3, now=T0).id == jid
    with sessions() as s:  # still leased
        assert claim(s, owner="b", lease_seconds=10, max_attempts=3, now=T0) is None
    with sessions() as s:
        job = claim(
            s, owner="b", lease_seconds=10, max_attempts=3, now=T0 + dt.timedelta(seconds=11)
        )
        assert job is not None and job.id == jid and job.attempts == 2
    with sessions() as s:  # the old owner cannot finish it any more
        assert not finish(s, job, owner="a")
        assert finish(s, job, owner="b")
        s.commit()


def test_failing_job_is_retried_then_parked_with_its_error(sessions: sessionmaker[Session]) -> None:
    jid = _job(sessions)
    states = []
    for _ in range(3):
        with sessions() as s:
            job = claim(s, owner="w", lease_seconds=60, max_attempts=3)
            assert job is not None and job.id == jid
            states.append(fail(s, job, owner="w", error="ValueError: boom", max_attempts=3))
    assert states == ["queued", "queued", "parked"]
    with sessions() as s:
        parked = list_jobs(s, ["parked"])
        assert [j.last_error for j in parked] == ["ValueError: boom"]
        assert s.get(Series, "1.2.3.4").status == "failed"
        assert claim(s, owner="w", lease_seconds=60, max_attempts=3) is None
        assert retry_parked(s) == 1
        assert s.get(Series, "1.2.3.4").status == "queued"
        assert claim(s, owner="w", lease_seconds=60, max_attempts=3).id == jid


def test_job_whose_worker_keeps_dying_is_parked(sessions: sessionmaker[Session]) -> None:
    _job(sessions)
    now = T0
    for _ in range(3):  # claimed, then the worker "dies" and the lease lapses
        with sessions() as s:
            assert claim(s, owner="w", lease_seconds=1, max_attempts=3, now=now) is not None
        now += dt.timedelta(seconds=5)
    with sessions() as s:
        assert claim(s, owner="w", lease_seconds=1, max_attempts=3, now=now) is None
        assert list_jobs(s, ["parked"])[0].last_error.startswith("worker lost 3 times")


def test_restart_requeues_what_this_node_held(sessions: sessionmaker[Session]) -> None:
    jid = _job(sessions)
    with sessions() as s:
        claim(s, owner="node/worker-0", lease_seconds=3600, max_attempts=3)
    with sessions() as s:
        assert release_owner(s, "node/worker-0") == 1
        assert claim(s, owner="node/worker-0", lease_seconds=60, max_attempts=3).id == jid


def test_series_complete_after_stable_seconds(settings: Settings, sessions) -> None:  # type: ignore[no-untyped-def]
    cfg = settings.series.model_copy(update={"stable_seconds": 60, "release_grace_seconds": 5})
    _series(sessions, "1.2.9", last_received_at=T0, open_associations=1)
    assert queue_complete_series(sessions, cfg, now=T0 + dt.timedelta(seconds=59)) == []
    assert queue_complete_series(sessions, cfg, now=T0 + dt.timedelta(seconds=60)) == ["1.2.9"]
    # queued once only
    assert queue_complete_series(sessions, cfg, now=T0 + dt.timedelta(seconds=99)) == []
    with sessions() as s:
        assert s.get(Series, "1.2.9").status == "queued"
        assert [j.series_instance_uid for j in list_jobs(s, ["queued"])] == ["1.2.9"]
        assert s.scalar(select(Event.event).where(Event.stage == "assemble")) == "complete"


def test_association_release_shortens_the_wait(settings: Settings, sessions) -> None:  # type: ignore[no-untyped-def]
    cfg = settings.series.model_copy(update={"stable_seconds": 60, "release_grace_seconds": 5})
    _series(
        sessions,
        "1.2.10",
        last_received_at=T0,
        open_associations=0,
        released_at=T0 + dt.timedelta(seconds=1),
    )
    _series(
        sessions,
        "1.2.11",
        last_received_at=T0,
        open_associations=1,
        released_at=T0 + dt.timedelta(seconds=1),
    )  # another association still open
    assert queue_complete_series(sessions, cfg, now=T0 + dt.timedelta(seconds=4)) == []
    assert queue_complete_series(sessions, cfg, now=T0 + dt.timedelta(seconds=6)) == ["1.2.10"]


def test_completion_state_is_in_sql(settings: Settings, sessions) -> None:  # type: ignore[no-untyped-def]
    """A fresh session factory (a restarted process) sees the same state."""
    from qgate.core.db import make_engine, make_session_factory

    _series(sessions, "1.2.12", last_received_at=utcnow() - dt.timedelta(seconds=120))
    engine = make_engine(settings.database.url)
    try:
        fresh = make_session_factory(engine)
        assert queue_complete_series(fresh, settings.series) == ["1.2.12"]
        with fresh() as s:
            assert s.scalars(select(Job.series_instance_uid)).all() == ["1.2.12"]
    finally:
        engine.dispose()
