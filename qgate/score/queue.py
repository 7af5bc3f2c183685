"""Durable scoring queue in the SQL store.

Workers claim a job under a lease: on PostgreSQL the oldest claimable row is selected
``FOR UPDATE SKIP LOCKED`` (any number of workers on any number of nodes), on SQLite by a
conditional ``UPDATE ... WHERE state = 'queued'``. A lease that lapses (worker crashed or
hung, on whichever node) puts the job back; so does a restart of the worker that held it.
``attempts`` counts claims, so a job that keeps killing its worker is parked after
``max_attempts`` like one that keeps raising. A job a worker decoded ahead and holds while
it scores another (:mod:`qgate.score.prefetch`) does not count while it waits
(:func:`set_aside`, :func:`count_attempt`): a crash meanwhile is not its doing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from qgate.core.db.models import Job, Series, utcnow
from qgate.core.events import record

STAGE = "queue"

#: Called inside the transaction that parks a job (the gate's failure policy, which must
#: commit with the park so that a parked series is never left neither sent nor held).
OnParked = Callable[[Session, Job], None]


def enqueue_score(session: Session, *, series_uid: str, generation: int) -> Job:
    """Queue a scoring job for one generation of a series."""
    job = Job(kind="score", series_instance_uid=series_uid, generation=generation, state="queued")
    session.add(job)
    record(session, STAGE, "queued", series_uid=series_uid, detail=f"generation {generation}")
    return job


def _claimable(now: dt.datetime):  # type: ignore[no-untyped-def]
    return or_(
        Job.state == "queued",
        (Job.state == "running") & (Job.lease_expires_at < now),
    )


def claim(
    session: Session,
    *,
    owner: str,
    lease_seconds: float,
    max_attempts: int,
    now: dt.datetime | None = None,
    on_parked: OnParked | None = None,
) -> Job | None:
    """Claim the oldest claimable job for ``owner``, or return None. Commits.

    A job whose earlier claims all ended without a verdict (the worker died each time) is
    parked here instead of being handed out again (``on_parked`` as in :func:`fail`).
    """
    now = now or utcnow()
    while True:
        # PostgreSQL: the row is locked until the claim commits, and rows other workers
        # have locked are skipped, so concurrent workers take different jobs without
        # retrying. SQLite renders no FOR UPDATE (one writer at a time); there the
        # conditional UPDATE below decides.
        row = session.execute(
            select(Job.id, Job.attempts, Job.lease_owner)
            .where(_claimable(now))
            .order_by(Job.created_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if row is None:
            session.commit()
            return None
        job_id, attempts, last_owner = row
        if attempts >= max_attempts:
            job = session.get(Job, job_id)
            assert job is not None
            fail(
                session,
                job,
                owner=last_owner,
                error=job.last_error or f"worker lost {attempts} times (crash or lease timeout)",
                max_attempts=max_attempts,
                on_parked=on_parked,
            )
            continue
        won = session.execute(
            update(Job)
            .where(Job.id == job_id, _claimable(now))
            .values(
                state="running",
                lease_owner=owner,
                lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1,
                updated_at=now,
            )
        ).rowcount
        if won == 1:
            job = session.get(Job, job_id, populate_existing=True)
            assert job is not None
            record(
                session,
                STAGE,
                "claimed",
                series_uid=job.series_instance_uid,
                detail=f"job {job.id} by {owner}, attempt {job.attempts}",
            )
            session.commit()
            return job
        # Another worker won this one; look again.
        session.rollback()


def renew(session: Session, job: Job, *, owner: str, lease_seconds: float) -> bool:
    """Extend the lease; False if the job is no longer ours."""
    now = utcnow()
    n = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == "running", Job.lease_owner == owner)
        .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
    ).rowcount
    session.commit()
    return n == 1


def set_aside(session: Session, job: Job, *, owner: str) -> bool:
    """``job`` was decoded ahead and waits for its worker: its claim stops counting as an
    attempt until :func:`count_attempt`. False if the job is no longer ours. Commits.

    A worker that dies while the job waits (killed by the job it was scoring) then leaves
    its attempts as they were before the claim, so a job that only waited is never parked
    for another job's crashes; a crash while it is decoded or scored still counts.
    """
    n = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == "running", Job.lease_owner == owner)
        .values(attempts=Job.attempts - 1)
    ).rowcount
    session.commit()
    return n == 1


def count_attempt(session: Session, job: Job, *, owner: str) -> bool:
    """Count the attempt of a job set aside (:func:`set_aside`) again, as its model work
    starts; in the caller's transaction. False if the job is no longer ours."""
    n = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == "running", Job.lease_owner == owner)
        .values(attempts=Job.attempts + 1)
    ).rowcount
    return n == 1


def finish(session: Session, job: Job, *, owner: str, detail: str = "done") -> bool:
    """Mark ``job`` done inside the caller's transaction; False if we lost the lease."""
    n = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == "running", Job.lease_owner == owner)
        .values(state="done", lease_owner=None, lease_expires_at=None, last_error=None)
    ).rowcount
    if n == 1:
        record(
            session,
            STAGE,
            "done",
            series_uid=job.series_instance_uid,
            detail=f"job {job.id}: {detail}",
        )
    return n == 1


def fail(
    session: Session,
    job: Job,
    *,
    owner: str | None,
    error: str,
    max_attempts: int,
    retryable: bool = True,
    on_parked: OnParked | None = None,
) -> str:
    """Record a failed attempt. Returns the new state: 'queued' to retry, or 'parked'. Commits.

    A parked job marks its series ``failed`` and calls ``on_parked`` in the same
    transaction (the worker passes :func:`qgate.decide.gate.apply_failure_policy`).
    """
    parked = (not retryable) or job.attempts >= max_attempts
    state = "parked" if parked else "queued"
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.lease_owner.is_not_distinct_from(owner))
        .values(state=state, lease_owner=None, lease_expires_at=None, last_error=error[:4000])
    )
    record(
        session,
        STAGE,
        state,
        series_uid=job.series_instance_uid,
        detail=f"job {job.id} attempt {job.attempts}: {error[:500]}",
    )
    same_generation = (
        Series.series_instance_uid == job.series_instance_uid,
        Series.generation == job.generation,
    )
    if parked:
        session.execute(
            update(Series).where(*same_generation).values(status="failed", skip_reason=error[:4000])
        )
        if on_parked is not None:
            on_parked(session, job)
    else:  # back in the queue: nobody is scoring the series until the next claim
        session.execute(
            update(Series)
            .where(*same_generation, Series.status == "scoring")
            .values(status="queued")
        )
    session.commit()
    return state


def release_owner(session: Session, owner: str, *, why: str = "after restart") -> int:
    """Put back every running job held by ``owner`` (this node, before a restart; a worker
    stopping, with the jobs it decoded ahead). Commits."""
    jobs = session.scalars(
        select(Job).where(Job.state == "running", Job.lease_owner == owner)
    ).all()
    for job in jobs:
        job.state = "queued"
        job.lease_owner = None
        job.lease_expires_at = None
        session.execute(
            update(Series)
            .where(
                Series.series_instance_uid == job.series_instance_uid,
                Series.generation == job.generation,
                Series.status == "scoring",
            )
            .values(status="queued")
        )
        record(
            session,
            STAGE,
            "requeued",
            series_uid=job.series_instance_uid,
            detail=f"job {job.id} {why}",
        )
    session.commit()
    return len(jobs)


def list_jobs(session: Session, states: Sequence[str] | None = None) -> list[Job]:
    q = select(Job).order_by(Job.id)
    if states:
        q = q.where(Job.state.in_(list(states)))
    return list(session.scalars(q))


def _requeue_parked(session: Session, job: Job) -> None:
    job.state, job.attempts = "queued", 0
    series = session.get(Series, job.series_instance_uid)
    if series is not None and series.generation == job.generation:
        series.status, series.skip_reason = "queued", None
    record(session, STAGE, "retried", series_uid=job.series_instance_uid, detail=f"job {job.id}")


def retry_parked(session: Session, ids: Sequence[int] | None = None) -> int:
    """Requeue parked jobs (all, or ``ids``) with fresh attempts. Commits."""
    q = select(Job).where(Job.state == "parked")
    if ids:
        q = q.where(Job.id.in_(list(ids)))
    jobs = session.scalars(q).all()
    for job in jobs:
        _requeue_parked(session, job)
    session.commit()
    return len(jobs)


class RescoreError(Exception):
    """The series cannot be re-scored now (unknown, receiving, purged, or already queued)."""


def rescore(session: Session, *, series_uid: str, by: str) -> Job:
    """Score the current generation of a series again; joins the caller's transaction.

    Its parked job is requeued with fresh attempts, or a new job is queued (a series that
    was scored, or whose failure was released). The new result supersedes the current
    one; a held series stays held until that result decides.

    Raises
    ------
    RescoreError
        No such series, still receiving (it is scored once complete), its originals purged
        by retention, or a job for it is already queued or running.
    """
    series = session.get(Series, series_uid, with_for_update=True)
    if series is None:
        raise RescoreError(f"no such series: {series_uid}")
    if series.status == "receiving":
        raise RescoreError(f"series {series_uid} is still receiving; it is scored once complete")
    if series.originals_purged_at is not None:
        raise RescoreError(
            f"series {series_uid} cannot be re-scored: retention deleted its originals"
        )
    active = session.scalar(
        select(Job).where(
            Job.series_instance_uid == series_uid, Job.state.in_(("queued", "running"))
        )
    )
    if active is not None:
        raise RescoreError(
            f"series {series_uid} is already {active.state} for scoring (job {active.id})"
        )
    parked = session.scalar(
        select(Job)
        .where(
            Job.series_instance_uid == series_uid,
            Job.generation == series.generation,
            Job.state == "parked",
        )
        .order_by(Job.id.desc())
    )
    if parked is not None:
        job = parked
        _requeue_parked(session, job)
    else:
        job = enqueue_score(session, series_uid=series_uid, generation=series.generation)
        series.status, series.skip_reason = "queued", None
    session.flush()  # assigns a new job's id for the event
    record(session, STAGE, "rescore", series_uid=series_uid, detail=f"job {job.id} by {by}")
    return job
