"""The outbox: sends waiting in the SQL store, claimed under a lease, retried with backoff.

One row is one set of files for one destination, sent over one association. States::

    pending --claim--> sending --mark_sent--> sent
       ^                  |
       +---mark_failed----+ (attempts < max: next_attempt_at = now + backoff)
                          +---mark_failed---> dead (attempts == max) --retry--> pending

``attempts`` counts claims, so a send that keeps killing its dispatcher (the lease lapses
each time) is also dead-lettered after ``max_attempts``, like one that keeps failing.

Transactions: :func:`enqueue` joins the caller's transaction, so the outbox row commits
together with whatever produced the files (the transactional-outbox pattern). Every other
function commits its own change. Each state change writes its Event row (stage
``dispatch``) in the same transaction as the change.

Claims select the most overdue row ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (dispatchers
on several nodes pass over each other's rows) and then run a conditional ``UPDATE ...
WHERE id = ? AND <still claimable>`` whose rowcount says whether this dispatcher won; on
SQLite (one writer at a time) the conditional UPDATE alone decides. Any number of
dispatchers may share one database.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from qgate.core.config import DispatchConfig
from qgate.core.db.models import OutboxItem, utcnow
from qgate.core.events import record
from qgate.dispatch.scu import Destination

STAGE = "dispatch"

OutboxKind = Literal["results", "forward"]
OutboxState = Literal["pending", "sending", "sent", "dead"]
# The closed vocabulary of this stage's Event rows.
OutboxEvent = Literal["enqueued", "claimed", "sent", "retry_scheduled", "dead", "resubmitted"]
KINDS: frozenset[str] = frozenset({"results", "forward"})
STATES: frozenset[str] = frozenset({"pending", "sending", "sent", "dead"})

__all__ = [
    "Destination",
    "OutboxEvent",
    "OutboxKind",
    "OutboxState",
    "RetryPolicy",
    "claim_due",
    "destination_of",
    "enqueue",
    "list_items",
    "mark_failed",
    "mark_sent",
    "renew",
    "retry",
]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``initial * 2**(attempts-1)``, capped at ``max_seconds``."""

    max_attempts: int = 8
    initial_seconds: float = 5.0
    max_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_seconds <= 0 or self.max_seconds <= 0:
            raise ValueError("backoff seconds must be > 0")

    @classmethod
    def from_settings(cls, dispatch: DispatchConfig) -> RetryPolicy:
        return cls(
            max_attempts=dispatch.max_attempts,
            initial_seconds=dispatch.backoff_initial_seconds,
            max_seconds=dispatch.backoff_max_seconds,
        )

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
        exponent = min(max(attempts, 1) - 1, 62)  # 2**62 s is already "never"
        return min(self.initial_seconds * 2.0**exponent, self.max_seconds)


def _event(session: Session, item: OutboxItem, event: OutboxEvent, detail: str) -> None:
    record(session, STAGE, event, series_uid=item.series_instance_uid, detail=detail)


def _reload(session: Session, item_id: int) -> OutboxItem:
    """The row as it is now (the conditional UPDATEs bypass the identity map)."""
    item = session.get(OutboxItem, item_id, populate_existing=True)
    assert item is not None
    return item


def enqueue(
    session: Session,
    *,
    series_uid: str,
    kind: OutboxKind,
    paths: Sequence[str | Path],
    dest: Destination,
    now: dt.datetime | None = None,
) -> OutboxItem:
    """Add a pending send of ``paths`` to ``dest``, due now. Does not commit."""
    if kind not in KINDS:
        raise ValueError(f"outbox kind must be one of {sorted(KINDS)}, got {kind!r}")
    if not paths:
        raise ValueError("an outbox item needs at least one file")
    now = now or utcnow()
    item = OutboxItem(
        series_instance_uid=series_uid,
        kind=kind,
        dest_ae_title=dest.ae_title,
        dest_host=dest.host,
        dest_port=dest.port,
        paths=[str(p) for p in paths],
        state="pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(item)
    session.flush()  # assigns item.id for the event
    _event(session, item, "enqueued", f"outbox {item.id}: {kind}, {len(paths)} file(s) to {dest}")
    return item


def destination_of(item: OutboxItem) -> Destination:
    return Destination(ae_title=item.dest_ae_title, host=item.dest_host, port=item.dest_port)


def _claimable(due_by: dt.datetime, now: dt.datetime) -> ColumnElement[bool]:
    return or_(
        and_(OutboxItem.state == "pending", OutboxItem.next_attempt_at <= due_by),
        and_(OutboxItem.state == "sending", OutboxItem.lease_expires_at <= now),
    )


def claim_due(
    session: Session,
    *,
    owner: str,
    lease_seconds: float,
    now: dt.datetime,
    due_by: dt.datetime | None = None,
    max_attempts: int | None = None,
) -> OutboxItem | None:
    """Claim the most overdue send for ``owner``, or return None. Commits.

    Claimable: ``pending`` with ``next_attempt_at <= due_by`` (default ``now``), or
    ``sending`` whose lease expired at or before ``now`` (its dispatcher died or hung).
    With ``max_attempts``, an expired lease that was already the last attempt is
    dead-lettered here rather than handed out again.
    """
    due_by = due_by or now
    # PostgreSQL keeps the selected row locked (FOR UPDATE SKIP LOCKED) until the claim
    # commits, so concurrent dispatchers pass over each other's rows; SQLite renders no
    # FOR UPDATE and relies on the conditional UPDATE below.
    locking = session.get_bind().dialect.name == "postgresql"
    while True:
        row = session.execute(
            select(OutboxItem.id, OutboxItem.state, OutboxItem.attempts)
            .where(_claimable(due_by, now))
            .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if not locking:
            # End the read before writing: a SQLite reader that later writes can hit
            # SQLITE_BUSY_SNAPSHOT without waiting; a fresh write transaction waits its turn.
            session.commit()
        if row is None:
            session.commit()
            return None
        item_id, state, attempts = row
        if state == "sending" and max_attempts is not None and attempts >= max_attempts:
            _dead_after_lost_lease(session, item_id, now=now)
            continue
        won = session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == item_id, _claimable(due_by, now))
            .values(
                state="sending",
                lease_owner=owner,
                lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                attempts=OutboxItem.attempts + 1,
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if won != 1:
            session.rollback()  # another dispatcher won this one; look again
            continue
        item = _reload(session, item_id)
        how = "re-claimed after an expired lease" if state == "sending" else "claimed"
        _event(
            session, item, "claimed", f"outbox {item.id} {how} by {owner}, attempt {item.attempts}"
        )
        session.commit()
        return item


def _dead_after_lost_lease(session: Session, item_id: int, *, now: dt.datetime) -> None:
    error = "lease expired on the final attempt (dispatcher crashed or hung)"
    n = session.execute(
        update(OutboxItem)
        .where(
            OutboxItem.id == item_id,
            OutboxItem.state == "sending",
            OutboxItem.lease_expires_at <= now,
        )
        .values(state="dead", lease_owner=None, lease_expires_at=None, last_error=error)
        .execution_options(synchronize_session=False)
    ).rowcount
    if n == 1:
        item = _reload(session, item_id)
        _event(session, item, "dead", f"outbox {item.id} after {item.attempts} attempt(s): {error}")
        session.commit()
    else:
        session.rollback()


def _owned(item: OutboxItem, owner: str) -> ColumnElement[bool]:
    return and_(
        OutboxItem.id == item.id,
        OutboxItem.state == "sending",
        OutboxItem.lease_owner == owner,
    )


def renew(
    session: Session,
    item: OutboxItem,
    *,
    owner: str,
    lease_seconds: float,
    now: dt.datetime | None = None,
) -> bool:
    """Extend ``owner``'s lease on ``item``; False if it is no longer ours. Commits."""
    now = now or utcnow()
    n = session.execute(
        update(OutboxItem)
        .where(_owned(item, owner))
        .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    return n == 1


def mark_sent(
    session: Session,
    item: OutboxItem,
    *,
    owner: str,
    detail: str = "",
    now: dt.datetime | None = None,
) -> bool:
    """Record delivery. False (and no change) if ``owner`` no longer holds the lease. Commits."""
    now = now or utcnow()
    n = session.execute(
        update(OutboxItem)
        .where(_owned(item, owner))
        .values(state="sent", sent_at=now, lease_owner=None, lease_expires_at=None, last_error=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    if n != 1:
        session.rollback()
        return False
    fresh = _reload(session, item.id)
    text = f"outbox {fresh.id} on attempt {fresh.attempts}"
    _event(session, fresh, "sent", f"{text}: {detail}" if detail else text)
    session.commit()
    return True


def mark_failed(
    session: Session,
    item: OutboxItem,
    *,
    owner: str,
    error: str,
    policy: RetryPolicy,
    now: dt.datetime | None = None,
) -> OutboxState | None:
    """Record a failed attempt: back to ``pending`` after a backoff, or ``dead``. Commits.

    Returns the new state, or None (and no change) if ``owner`` lost the lease.
    """
    now = now or utcnow()
    current = session.execute(
        select(OutboxItem.attempts).where(_owned(item, owner))
    ).scalar_one_or_none()
    if current is None:
        session.rollback()
        return None
    error = error[:4000]
    if current >= policy.max_attempts:
        state: OutboxState = "dead"
        values: dict[str, object] = {"state": "dead"}
        detail = f"after {current} attempt(s): {error[:500]}"
    else:
        state = "pending"
        delay = policy.delay(current)
        values = {"state": "pending", "next_attempt_at": now + dt.timedelta(seconds=delay)}
        detail = f"attempt {current} failed, next in {delay:g} s: {error[:500]}"
    n = session.execute(
        update(OutboxItem)
        .where(_owned(item, owner), OutboxItem.attempts == current)
        .values(lease_owner=None, lease_expires_at=None, last_error=error, **values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if n != 1:
        session.rollback()
        return None
    fresh = _reload(session, item.id)
    _event(
        session,
        fresh,
        "dead" if state == "dead" else "retry_scheduled",
        f"outbox {fresh.id} {detail}",
    )
    session.commit()
    return state


def list_items(
    session: Session,
    state: OutboxState | None = None,
    *,
    series_uid: str | None = None,
) -> list[OutboxItem]:
    """Outbox rows, oldest first, optionally filtered by state and series."""
    if state is not None and state not in STATES:
        raise ValueError(f"outbox state must be one of {sorted(STATES)}, got {state!r}")
    q = select(OutboxItem).order_by(OutboxItem.id)
    if state is not None:
        q = q.where(OutboxItem.state == state)
    if series_uid is not None:
        q = q.where(OutboxItem.series_instance_uid == series_uid)
    return list(session.scalars(q.execution_options(populate_existing=True)))


def retry(
    session: Session,
    ids: Sequence[int] | None = None,
    *,
    now: dt.datetime | None = None,
) -> int:
    """Resubmit dead letters (all, or those in ``ids``) as fresh, due sends. Commits.

    Ids that are not dead are ignored. Returns how many were resubmitted. ``last_error``
    is kept until the next attempt overwrites it; the event trail has the full history.
    """
    now = now or utcnow()
    q = select(OutboxItem).where(OutboxItem.state == "dead").order_by(OutboxItem.id)
    if ids is not None:
        if not ids:
            return 0
        q = q.where(OutboxItem.id.in_(list(ids)))
    count = 0
    for item_id in session.scalars(q.with_only_columns(OutboxItem.id)).all():
        n = session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == item_id, OutboxItem.state == "dead")
            .values(
                state="pending",
                attempts=0,
                next_attempt_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if n == 1:
            count += 1
            item = _reload(session, item_id)
            _event(session, item, "resubmitted", f"outbox {item_id} resubmitted from dead letters")
    session.commit()
    return count
