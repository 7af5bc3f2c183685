"""Retention: delete what has served its purpose, never what is unsent or unscored.

Run by ``qgate purge`` and, inside ``qgate serve``, on ``retention.cron``. Each kind of
data has its own age (``retention.*_days``; null keeps it):

* **Spool originals** of a series: only when the series is ``scored``, not held, and has
  no forward send that is pending, in flight or dead. Then either every instance's file
  was acknowledged by the archive (a ``sent`` forward item lists it) at least
  ``delivered_originals_days`` ago, or, in ``observe`` mode where qgate forwards nothing,
  the series was scored at least ``scored_originals_days`` ago. The ``instances`` rows
  stay (what was received, and duplicate detection); ``series.originals_purged_at`` marks
  the series.
* **Outgoing files** (SR, quality maps) of a ``results`` send that succeeded at least
  ``sent_outgoing_days`` ago, unless another unsent item lists the same file;
  ``outbox.purged_at`` marks the item.
* **Event rows** older than ``events_days``; **audit rows** older than ``audit_days``.

Each deletion commits with its event row (``stage='retention'``). Files are deleted inside
the transaction that marks them, after the guarded update: a crash in between leaves the
mark uncommitted, and the next run deletes the rest (a missing file is not an error).
Only files under the spool and outgoing folders are ever deleted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Update, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db.models import AuditEntry, Event, Instance, OutboxItem, Result, Series, utcnow
from qgate.core.events import record
from qgate.core.storage import to_local

log = logging.getLogger(__name__)

STAGE = "retention"
UNSENT_STATES = ("pending", "sending", "dead")

Why = Literal["delivered", "scored"]


@dataclass(frozen=True)
class OriginalsPurge:
    """The spool files of one series that may go."""

    series_instance_uid: str
    generation: int
    why: Why
    paths: tuple[str, ...]
    bytes: int


@dataclass(frozen=True)
class OutgoingPurge:
    """The outgoing files of one sent ``results`` item that may go."""

    outbox_id: int
    series_instance_uid: str
    paths: tuple[str, ...]
    bytes: int


@dataclass(frozen=True)
class PurgePlan:
    originals: tuple[OriginalsPurge, ...] = ()
    outgoing: tuple[OutgoingPurge, ...] = ()
    events_before: dt.datetime | None = None
    events: int = 0
    audit_before: dt.datetime | None = None
    audit: int = 0


@dataclass
class PurgeReport:
    """What a run deleted (or, with ``dry_run``, would delete)."""

    dry_run: bool
    originals_series: int = 0
    originals_files: int = 0
    originals_bytes: int = 0
    outgoing_items: int = 0
    outgoing_files: int = 0
    outgoing_bytes: int = 0
    events: int = 0
    audit: int = 0
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"{verb}: originals of {self.originals_series} series ({self.originals_files} "
            f"files, {self.originals_bytes / 1e6:.1f} MB), outgoing files of "
            f"{self.outgoing_items} sends ({self.outgoing_files} files, "
            f"{self.outgoing_bytes / 1e6:.1f} MB), {self.events} event rows, "
            f"{self.audit} audit rows"
        )


def _cutoff(now: dt.datetime, days: float | None) -> dt.datetime | None:
    return None if days is None else now - dt.timedelta(days=days)


def _under(path: str, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _local(stored: str, root: Path) -> str:
    """A stored path (relative to storage.root) as this node's absolute path."""
    return str(to_local(stored, root))


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _originals(session: Session, settings: Settings, now: dt.datetime) -> list[OriginalsPurge]:
    cfg = settings.retention
    delivered_before = _cutoff(now, cfg.delivered_originals_days)
    scored_before = _cutoff(now, cfg.scored_originals_days)
    if settings.gate.mode != "observe":
        scored_before = None  # forward and gate modes: originals go only once delivered
    if delivered_before is None and scored_before is None:
        return []
    unsent_forward = (
        select(OutboxItem.id)
        .where(
            OutboxItem.series_instance_uid == Series.series_instance_uid,
            OutboxItem.kind == "forward",
            OutboxItem.state.in_(UNSENT_STATES),
        )
        .exists()
    )
    candidates = session.scalars(
        select(Series)
        .where(
            Series.status == "scored",
            Series.held.is_(False),
            Series.originals_purged_at.is_(None),
            ~unsent_forward,
        )
        .order_by(Series.updated_at)
    ).all()
    plans: list[OriginalsPurge] = []
    root, spool = settings.storage.root, settings.spool_dir
    for series in candidates:
        uid = series.series_instance_uid
        instances = [
            (_local(p, root), size)
            for p, size in session.execute(
                select(Instance.path, Instance.size).where(Instance.series_instance_uid == uid)
            )
        ]
        paths = [p for p, _ in instances if _under(p, spool)]
        if not paths:
            continue
        forwards = session.execute(
            select(OutboxItem.paths, OutboxItem.sent_at).where(
                OutboxItem.series_instance_uid == uid,
                OutboxItem.kind == "forward",
                OutboxItem.state == "sent",
            )
        ).all()
        why: Why | None = None
        if forwards:
            sent = {_local(p, root) for item_paths, _ in forwards for p in item_paths}
            last_sent = max((s for _, s in forwards if s is not None), default=None)
            every_file_sent = all(p in sent for p, _ in instances)
            if (
                every_file_sent
                and delivered_before is not None
                and last_sent is not None
                and last_sent <= delivered_before
            ):
                why = "delivered"
        elif scored_before is not None:
            scored_at = session.scalar(
                select(func.max(Result.created_at)).where(Result.series_instance_uid == uid)
            )
            if scored_at is not None and scored_at <= scored_before:
                why = "scored"
        if why is not None:
            kept = set(paths)
            size = sum(int(s or 0) for p, s in instances if p in kept)
            plans.append(OriginalsPurge(uid, series.generation, why, tuple(paths), size))
    return plans


def _outgoing(session: Session, settings: Settings, now: dt.datetime) -> list[OutgoingPurge]:
    before = _cutoff(now, settings.retention.sent_outgoing_days)
    if before is None:
        return []
    # A file listed by an item not yet sent (a resubmission, a re-send) stays.
    root = settings.storage.root
    unsent = {
        _local(p, root)
        for item_paths in session.scalars(
            select(OutboxItem.paths).where(OutboxItem.state.in_(UNSENT_STATES))
        )
        for p in item_paths
    }
    items = session.scalars(
        select(OutboxItem)
        .where(
            OutboxItem.kind == "results",
            OutboxItem.state == "sent",
            OutboxItem.purged_at.is_(None),
            OutboxItem.sent_at <= before,
        )
        .order_by(OutboxItem.id)
    ).all()
    out = settings.outgoing_dir
    plans = []
    for item in items:
        local = [_local(p, root) for p in item.paths]
        paths = tuple(p for p in local if _under(p, out) and p not in unsent)
        if len(paths) == len(item.paths):
            plans.append(
                OutgoingPurge(
                    item.id, item.series_instance_uid, paths, sum(_size(p) for p in paths)
                )
            )
    return plans


def plan_purge(session: Session, settings: Settings, *, now: dt.datetime) -> PurgePlan:
    """What a run at ``now`` may delete (reads only)."""
    cfg = settings.retention
    events_before = _cutoff(now, cfg.events_days)
    audit_before = _cutoff(now, cfg.audit_days)
    events = audit = 0
    if events_before is not None:
        q = select(func.count(Event.id)).where(Event.at < events_before)
        events = int(session.scalar(q) or 0)
    if audit_before is not None:
        q = select(func.count(AuditEntry.id)).where(AuditEntry.at < audit_before)
        audit = int(session.scalar(q) or 0)
    return PurgePlan(
        originals=tuple(_originals(session, settings, now)),
        outgoing=tuple(_outgoing(session, settings, now)),
        events_before=events_before,
        events=events,
        audit_before=audit_before,
        audit=audit,
    )


def _unlink(paths: Iterable[str]) -> int:
    """Delete files (a missing one counts as done) and then their emptied folders."""
    removed = 0
    folders = set()
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
            removed += 1
        folders.add(os.path.dirname(p))
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty (a late instance), or gone
            os.rmdir(folder)
    return removed


def _mark_then_unlink(
    session: Session,
    guarded: Update,
    *,
    event: str,
    series_uid: str,
    detail: str,
    paths: tuple[str, ...],
) -> bool:
    """Run the guarded mark (one row or nothing), add its event, delete the files, commit.

    The guard re-checks the state the plan saw: a late instance (status back to
    receiving, a new generation), a resubmitted send or a concurrent purge makes the
    whole step a no-op. The files go before the commit, so a commit that fails leaves
    them unmarked and the next run finishes the job.
    """
    marked = session.execute(guarded.execution_options(synchronize_session=False))
    if marked.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    record(session, STAGE, event, series_uid=series_uid, detail=detail)
    session.flush()
    _unlink(paths)
    session.commit()
    return True


def _purge_originals(session: Session, plan: OriginalsPurge, now: dt.datetime) -> bool:
    guarded = (
        update(Series)
        .where(
            Series.series_instance_uid == plan.series_instance_uid,
            Series.generation == plan.generation,
            Series.status == "scored",
            Series.held.is_(False),
            Series.originals_purged_at.is_(None),
        )
        .values(originals_purged_at=now)
    )
    return _mark_then_unlink(
        session,
        guarded,
        event="originals_purged",
        series_uid=plan.series_instance_uid,
        detail=f"{len(plan.paths)} files, {plan.bytes} bytes ({plan.why})",
        paths=plan.paths,
    )


def _purge_outgoing(session: Session, plan: OutgoingPurge, now: dt.datetime) -> bool:
    guarded = (
        update(OutboxItem)
        .where(
            OutboxItem.id == plan.outbox_id,
            OutboxItem.state == "sent",
            OutboxItem.purged_at.is_(None),
        )
        .values(purged_at=now)
    )
    return _mark_then_unlink(
        session,
        guarded,
        event="outgoing_purged",
        series_uid=plan.series_instance_uid,
        detail=f"outbox {plan.outbox_id}: {len(plan.paths)} files, {plan.bytes} bytes",
        paths=plan.paths,
    )


def run_purge(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    dry_run: bool = False,
    now: dt.datetime | None = None,
) -> PurgeReport:
    """Apply ``settings.retention`` once; with ``dry_run`` only report what would go."""
    now = now or utcnow()
    with sessions() as session:
        plan = plan_purge(session, settings, now=now)
    report = PurgeReport(dry_run=dry_run)
    if dry_run:
        report.originals_series = len(plan.originals)
        report.originals_files = sum(len(p.paths) for p in plan.originals)
        report.originals_bytes = sum(p.bytes for p in plan.originals)
        report.outgoing_items = len(plan.outgoing)
        report.outgoing_files = sum(len(p.paths) for p in plan.outgoing)
        report.outgoing_bytes = sum(p.bytes for p in plan.outgoing)
        report.events, report.audit = plan.events, plan.audit
        return report
    for op in plan.originals:
        with sessions() as session:
            if _purge_originals(session, op, now):
                report.originals_series += 1
                report.originals_files += len(op.paths)
                report.originals_bytes += op.bytes
            else:
                report.skipped.append(f"series {op.series_instance_uid}: changed meanwhile")
    for og in plan.outgoing:
        with sessions() as session:
            if _purge_outgoing(session, og, now):
                report.outgoing_items += 1
                report.outgoing_files += len(og.paths)
                report.outgoing_bytes += og.bytes
            else:
                report.skipped.append(f"outbox {og.outbox_id}: changed meanwhile")
    if plan.events_before is not None or plan.audit_before is not None:
        with sessions() as session:
            report.events, report.audit = _purge_rows(session, plan)
    log.info("retention: %s", report.summary())
    return report


def _purge_rows(session: Session, plan: PurgePlan) -> tuple[int, int]:
    events = audit = 0
    if plan.events_before is not None:
        result = session.execute(delete(Event).where(Event.at < plan.events_before))
        events = int(result.rowcount or 0)  # type: ignore[attr-defined]
        if events:
            record(
                session,
                STAGE,
                "events_purged",
                detail=f"{events} event rows before {plan.events_before.isoformat()}",
            )
    if plan.audit_before is not None:
        result = session.execute(delete(AuditEntry).where(AuditEntry.at < plan.audit_before))
        audit = int(result.rowcount or 0)  # type: ignore[attr-defined]
        if audit:
            session.add(
                AuditEntry(
                    user_id=None,
                    username="retention",
                    action="audit_purged",
                    detail={"rows": audit, "before": plan.audit_before.isoformat()},
                )
            )
    session.commit()
    return events, audit
