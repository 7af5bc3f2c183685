"""Gate mode: flagged series are held until a person releases them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from qgate.config import Settings
from qgate.db.models import Instance, Series
from qgate.dispatch.outbox import Destination, enqueue
from qgate.events import record


class ReleaseError(Exception):
    """The series cannot be released (unknown, or not held)."""


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
    paths = list(
        session.scalars(
            select(Instance.path)
            .where(Instance.series_instance_uid == series_uid)
            .order_by(Instance.instance_number, Instance.id)
        )
    )
    enqueue(
        session,
        series_uid=series_uid,
        kind="forward",
        paths=paths,
        dest=Destination.from_settings(settings.archive),
    )
    series.held = False
    record(session, "gate", "released", series_uid=series_uid, detail=f"by {by}")
    session.commit()
    return len(paths)
