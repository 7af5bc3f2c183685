"""What an operator can do to one series: release, rescore, resubmit. Shared by the CLI and
the review app, so both leave the same trail.

Each action writes its audit row (``audit_log``, who and from where) and its event rows
(``events``, what changed) in the transaction of the change, and commits. The CLI acts as
the user ``cli``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qgate.core.config import Settings
from qgate.core.db.models import AuditEntry, Instance, Series
from qgate.decide.gate import ReleaseError, release_series
from qgate.dispatch.outbox import list_items
from qgate.dispatch.outbox import retry as retry_sends
from qgate.score.queue import RescoreError
from qgate.score.queue import rescore as queue_rescore


class ActionError(Exception):
    """The action does not fit the series' state (or the series does not exist)."""


@dataclass(frozen=True)
class Actor:
    """Who acts: a review-app user (with id and address), or the command line."""

    username: str
    user_id: int | None = None
    remote_addr: str | None = None


CLI = Actor("cli")


def _audit(
    session: Session, actor: Actor, action: str, series_uid: str, detail: dict[str, Any]
) -> None:
    session.add(
        AuditEntry(
            user_id=actor.user_id,
            username=actor.username,
            action=action,
            series_instance_uid=series_uid,
            detail=detail,
            remote_addr=actor.remote_addr,
        )
    )


def _series(session: Session, series_uid: str) -> Series:
    series = session.get(Series, series_uid, with_for_update=True)
    if series is None:
        raise ActionError(f"no such series: {series_uid}")
    return series


def release(
    session: Session,
    settings: Settings,
    *,
    series_uid: str,
    actor: Actor,
    detail: dict[str, Any] | None = None,
) -> int:
    """Send a held series' originals to the archive. Returns the instances queued."""
    series = _series(session, series_uid)
    if not series.held:
        raise ActionError(
            f"series {series_uid} is not held (gate mode {settings.gate.mode}, "
            f"status {series.status}, decision {series.decision or '-'})"
        )
    count = select(func.count(Instance.id)).where(Instance.series_instance_uid == series_uid)
    _audit(
        session,
        actor,
        "release",
        series_uid,
        {"instances": int(session.scalar(count) or 0), **(detail or {})},
    )
    try:
        return release_series(session, settings, series_uid, by=actor.username)
    except ReleaseError as exc:
        session.rollback()
        raise ActionError(str(exc)) from exc


def rescore(session: Session, *, series_uid: str, actor: Actor) -> int:
    """Queue the series for scoring again (its parked job, or a new one). Returns the job id."""
    try:
        job = queue_rescore(session, series_uid=series_uid, by=actor.username)
    except RescoreError as exc:
        session.rollback()
        raise ActionError(str(exc)) from exc
    _audit(session, actor, "rescore", series_uid, {"job_id": job.id, "generation": job.generation})
    session.commit()
    return job.id


def resubmit(session: Session, *, series_uid: str, actor: Actor) -> int:
    """Send the series' dead-lettered sends again. Returns how many were resubmitted."""
    _series(session, series_uid)
    dead = [i.id for i in list_items(session, "dead", series_uid=series_uid)]
    if not dead:
        raise ActionError(f"series {series_uid} has no dead-lettered send to resubmit")
    _audit(session, actor, "resubmit", series_uid, {"outbox_ids": dead})
    return retry_sends(session, dead)  # commits the audit row with the resubmission
