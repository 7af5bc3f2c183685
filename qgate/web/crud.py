"""Data access for the review app. Functions take the session first and keyword-only
arguments after it; the ones that change state write their audit row in the same
transaction and commit."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.orm import Session

from qgate.core.config import Settings, Threshold
from qgate.core.db.models import AuditEntry, Event, OutboxItem, Result, Series, User, Verdict
from qgate.web import actions
from qgate.web.schemas import VerdictCreate, VerdictPublic, WorklistQuery


class NotFound(LookupError):
    """No such series (or result)."""


class Conflict(RuntimeError):
    """The action does not fit the series' state (no result to review, not held)."""


@dataclass(frozen=True)
class WorklistRow:
    series: Series
    result: Result | None
    verdict: Verdict | None
    verdict_user: str | None


def audit(
    session: Session,
    *,
    user: User | None,
    action: str,
    detail: dict[str, Any],
    series_uid: str | None = None,
    remote_addr: str | None = None,
    username: str | None = None,
) -> None:
    """Add an audit row to ``session``; it commits with the action it describes."""
    session.add(
        AuditEntry(
            user_id=user.id if user is not None else None,
            username=user.username if user is not None else (username or "-"),
            action=action,
            series_instance_uid=series_uid,
            detail=detail,
            remote_addr=remote_addr,
        )
    )


# -- worklist ----------------------------------------------------------------------------------


def _current_result_join() -> Any:
    return and_(
        Result.series_instance_uid == Series.series_instance_uid, Result.superseded_by.is_(None)
    )


def _latest_verdict_ids() -> Any:
    return (
        select(Verdict.series_instance_uid, func.max(Verdict.id).label("vid"))
        .group_by(Verdict.series_instance_uid)
        .subquery()
    )


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


def _filtered(
    query: WorklistQuery, base: Select[Series, Result, Verdict, str], latest: Any
) -> Select[Series, Result, Verdict, str]:
    conds: list[ColumnElement[bool]] = []
    # A failed series needs a person as much as a flagged one: it is listed with them.
    failed = Series.status == "failed"
    if query.decision == "flag":
        conds.append(or_(Result.decision == "flag", failed))
    elif query.decision == "pass":
        conds.append(and_(Result.decision == "pass", ~failed))
    if query.review == "pending":
        conds.append(latest.c.vid.is_(None))
    elif query.review == "done":
        conds.append(latest.c.vid.is_not(None))
    if query.date_from is not None:
        conds.append(Series.last_received_at >= _day_start(query.date_from))
    if query.date_to is not None:
        conds.append(Series.last_received_at < _day_start(query.date_to + dt.timedelta(days=1)))
    if query.calling_aet:
        conds.append(Series.calling_aet == query.calling_aet)
    if query.score and (query.score_min is not None or query.score_max is not None):
        scorer, output = query.score.split(".", 1)
        value = Result.scores[(scorer, output)].as_float()
        if query.score_min is not None:
            conds.append(value >= query.score_min)
        if query.score_max is not None:
            conds.append(value <= query.score_max)
    return base.where(*conds) if conds else base


def list_series(
    session: Session, *, query: WorklistQuery, per_page: int
) -> tuple[list[WorklistRow], int]:
    """One page of the worklist, newest first, and the number of matching series."""
    latest = _latest_verdict_ids()
    base = (
        select(Series, Result, Verdict, User.username)
        .outerjoin(Result, _current_result_join())
        .outerjoin(latest, latest.c.series_instance_uid == Series.series_instance_uid)
        .outerjoin(Verdict, Verdict.id == latest.c.vid)
        .outerjoin(User, User.id == Verdict.user_id)
    )
    filtered = _filtered(query, base, latest)
    total = session.scalar(select(func.count()).select_from(filtered.subquery())) or 0
    rows = session.execute(
        filtered.order_by(Series.last_received_at.desc(), Series.series_instance_uid)
        .limit(per_page)
        .offset((query.page - 1) * per_page)
    ).all()
    return [WorklistRow(s, r, v, u) for s, r, v, u in rows], int(total)


def calling_aets(session: Session) -> list[str]:
    """The calling AE titles seen, for the worklist filter."""
    q = select(Series.calling_aet).where(Series.calling_aet.is_not(None)).distinct()
    return sorted(a for a in session.scalars(q) if a)


def score_keys(session: Session, *, thresholds: Sequence[Threshold], sample: int = 50) -> list[str]:
    """``scorer.output`` names to filter on: the gate's, then numeric outputs seen recently."""
    keys = [f"{t.scorer}.{t.output}" for t in thresholds]
    recent = session.scalars(
        select(Result.scores).where(Result.superseded_by.is_(None)).order_by(Result.id.desc())
    ).fetchmany(sample)
    for scores in recent:
        for scorer, entry in (scores or {}).items():
            if not isinstance(entry, dict):
                continue
            for output, value in entry.items():
                numeric = isinstance(value, int | float) and not isinstance(value, bool)
                key = f"{scorer}.{output}"
                if numeric and key not in keys:
                    keys.append(key)
    return keys


# -- one series --------------------------------------------------------------------------------


def get_series(session: Session, *, series_uid: str) -> Series:
    series = session.get(Series, series_uid)
    if series is None:
        raise NotFound(f"no such series: {series_uid}")
    return series


def current_result(session: Session, *, series_uid: str) -> Result | None:
    return session.scalar(
        select(Result).where(
            Result.series_instance_uid == series_uid, Result.superseded_by.is_(None)
        )
    )


def get_result(session: Session, *, series_uid: str, result_id: int) -> Result:
    result = session.get(Result, result_id)
    if result is None or result.series_instance_uid != series_uid:
        raise NotFound(f"no result {result_id} for series {series_uid}")
    return result


def verdict_public(verdict: Verdict, username: str) -> VerdictPublic:
    return VerdictPublic(
        id=verdict.id,
        series_instance_uid=verdict.series_instance_uid,
        result_id=verdict.result_id,
        decision=verdict.decision,
        agrees=verdict.agrees,
        score=verdict.score,
        comment=verdict.comment,
        username=username,
        created_at=verdict.created_at,
    )


def verdicts_of(session: Session, *, series_uid: str) -> list[VerdictPublic]:
    """Every verdict on the series, newest first."""
    rows = session.execute(
        select(Verdict, User.username)
        .join(User, User.id == Verdict.user_id)
        .where(Verdict.series_instance_uid == series_uid)
        .order_by(Verdict.id.desc())
    ).all()
    return [verdict_public(v, u) for v, u in rows]


@dataclass(frozen=True)
class TrailItem:
    at: dt.datetime
    who: str
    what: str
    detail: str


def series_trail(session: Session, *, series_uid: str, limit: int = 200) -> list[TrailItem]:
    """The pipeline's events and the people's actions on one series, newest first."""
    events = session.scalars(
        select(Event)
        .where(Event.series_instance_uid == series_uid)
        .order_by(Event.id.desc())
        .limit(limit)
    )
    items = [TrailItem(e.at, "qgate", f"{e.stage} {e.event}", e.detail or "") for e in events]
    entries = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.series_instance_uid == series_uid)
        .order_by(AuditEntry.id.desc())
        .limit(limit)
    )
    for a in entries:
        detail = ", ".join(f"{k} {v}" for k, v in a.detail.items() if v not in (None, ""))
        items.append(TrailItem(a.at, a.username, a.action, detail))
    return sorted(items, key=lambda i: i.at, reverse=True)[:limit]


def _actor(user: User, remote_addr: str | None) -> actions.Actor:
    return actions.Actor(username=user.username, user_id=user.id, remote_addr=remote_addr)


def _release(
    session: Session,
    settings: Settings,
    series: Series,
    *,
    user: User,
    remote_addr: str | None,
    verdict_id: int | None = None,
) -> int:
    """Audit and release a held series; commits (:func:`qgate.web.actions.release`)."""
    try:
        return actions.release(
            session,
            settings,
            series_uid=series.series_instance_uid,
            actor=_actor(user, remote_addr),
            detail={"verdict_id": verdict_id},
        )
    except actions.ActionError as exc:
        session.rollback()  # also drops a verdict saved in the same transaction
        raise Conflict(str(exc)) from exc


def record_verdict(
    session: Session,
    *,
    settings: Settings,
    user: User,
    series_uid: str,
    data: VerdictCreate,
    remote_addr: str | None = None,
) -> tuple[VerdictPublic, int | None]:
    """Store a verdict on the series' current result, audit it, and release the series
    when asked; all in one transaction. Returns the verdict and the instances released.

    Raises
    ------
    NotFound
        No such series.
    Conflict
        The series has no result yet, or a release was asked for a series not held.
    """
    series = session.get(Series, series_uid, with_for_update=True)
    if series is None:
        raise NotFound(f"no such series: {series_uid}")
    result = current_result(session, series_uid=series_uid)
    if result is None:
        raise Conflict(f"series {series_uid} has no result to review yet")
    comment = (data.comment or "").strip() or None
    verdict = Verdict(
        series_instance_uid=series_uid,
        result_id=result.id,
        decision=result.decision,
        user_id=user.id,
        agrees=data.agrees,
        score=data.score,
        comment=comment,
    )
    session.add(verdict)
    session.flush()
    audit(
        session,
        user=user,
        action="verdict",
        series_uid=series_uid,
        detail={
            "verdict_id": verdict.id,
            "result_id": result.id,
            "decision": result.decision,
            "agrees": data.agrees,
            "score": data.score,
            "comment": comment,
        },
        remote_addr=remote_addr,
    )
    public = verdict_public(verdict, user.username)
    if data.release:
        released = _release(
            session, settings, series, user=user, remote_addr=remote_addr, verdict_id=verdict.id
        )
        return public, released
    session.commit()
    return public, None


def release(
    session: Session,
    *,
    settings: Settings,
    user: User,
    series_uid: str,
    remote_addr: str | None = None,
) -> int:
    """Release a series held in gate mode to the archive, audited. Returns the instances."""
    series = session.get(Series, series_uid, with_for_update=True)
    if series is None:
        raise NotFound(f"no such series: {series_uid}")
    return _release(session, settings, series, user=user, remote_addr=remote_addr)


def rescore(
    session: Session, *, user: User, series_uid: str, remote_addr: str | None = None
) -> int:
    """Queue the series for scoring again, audited (:func:`qgate.web.actions.rescore`).
    Returns the job id."""
    get_series(session, series_uid=series_uid)
    try:
        return actions.rescore(session, series_uid=series_uid, actor=_actor(user, remote_addr))
    except actions.ActionError as exc:
        raise Conflict(str(exc)) from exc


def resubmit(
    session: Session, *, user: User, series_uid: str, remote_addr: str | None = None
) -> int:
    """Send the series' dead letters again, audited (:func:`qgate.web.actions.resubmit`)."""
    get_series(session, series_uid=series_uid)
    try:
        return actions.resubmit(session, series_uid=series_uid, actor=_actor(user, remote_addr))
    except actions.ActionError as exc:
        session.rollback()
        raise Conflict(str(exc)) from exc


def dead_sends(session: Session, *, series_uid: str) -> int:
    """How many of the series' sends are dead letters (what resubmit would send again)."""
    q = select(func.count(OutboxItem.id)).where(
        OutboxItem.series_instance_uid == series_uid, OutboxItem.state == "dead"
    )
    return int(session.scalar(q) or 0)


# -- users and audit ---------------------------------------------------------------------------


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def list_audit(
    session: Session,
    *,
    page: int,
    per_page: int,
    action: str | None = None,
    username: str | None = None,
) -> tuple[list[AuditEntry], int]:
    """A page of the audit log, newest first."""
    conds = []
    if action:
        conds.append(AuditEntry.action == action)
    if username:
        conds.append(AuditEntry.username == username)
    q = select(AuditEntry).where(*conds)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(
        q.order_by(AuditEntry.id.desc()).limit(per_page).offset((page - 1) * per_page)
    )
    return list(rows), int(total)
