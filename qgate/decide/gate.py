"""Gate policy: which originals go to the archive, which wait for a person.

In ``gate`` mode a flagged series is held until someone releases it. A series whose
scoring failed for good (its job parked) follows ``gate.on_failure`` in ``forward`` and
``gate`` mode: ``forward`` sends its originals unscored, ``hold`` keeps them until released.
Nothing waits for ever: a held series is on the worklist and can be released.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from qgate.core.config import Settings
from qgate.core.db.models import Instance, Job, Series
from qgate.core.events import record
from qgate.dispatch.outbox import Destination, enqueue


class ReleaseError(Exception):
    """The series cannot be released (unknown, or not held)."""


def forward_originals(session: Session, settings: Settings, series: Series) -> int:
    """Queue every instance of ``series`` for the archive, in the caller's transaction.

    Marks the generation as forwarded, so a re-score of it does not send or hold it again.
    Returns the number of instances.
    """
    paths = list(
        session.scalars(
            select(Instance.path)
            .where(Instance.series_instance_uid == series.series_instance_uid)
            .order_by(Instance.instance_number, Instance.id)
        )
    )
    enqueue(
        session,
        series_uid=series.series_instance_uid,
        kind="forward",
        paths=paths,
        dest=Destination.from_settings(settings.archive),
    )
    series.held = False
    series.forwarded_generation = series.generation
    return len(paths)


def release_series(
    session: Session, settings: Settings, series_uid: str, *, by: str = "cli"
) -> int:
    """Queue a held series' originals for the archive. Returns the number of instances."""
    series = session.get(Series, series_uid)
    if series is None:
        raise ReleaseError(f"no such series: {series_uid}")
    if not series.held:
        raise ReleaseError(
            f"series {series_uid} is not held (status {series.status}, "
            f"decision {series.decision or '-'})"
        )
    n = forward_originals(session, settings, series)
    record(session, "gate", "released", series_uid=series_uid, detail=f"by {by}")
    session.commit()
    return n


def apply_failure_policy(session: Session, job: Job, *, settings: Settings) -> None:
    """``gate.on_failure`` for the series of a job that was just parked; joins the caller's
    transaction (the queue's, which also marks the series failed)."""
    action = settings.gate.failure_action
    series = session.get(Series, job.series_instance_uid, populate_existing=True)
    if action is None or series is None or series.generation != job.generation:
        return  # observe mode, or a newer generation that has its own job
    uid = series.series_instance_uid
    if series.forwarded_generation == series.generation:
        return  # released (or forwarded) already; a failed re-score changes nothing
    if action == "forward":
        n = forward_originals(session, settings, series)
        record(
            session,
            "gate",
            "forwarded_unscored",
            series_uid=uid,
            detail=f"scoring failed; {n} instance(s) sent unscored (gate.on_failure: forward)",
        )
    elif not series.held:
        series.held = True
        record(
            session,
            "gate",
            "held",
            series_uid=uid,
            detail="scoring failed; held until released (gate.on_failure: hold)",
        )
