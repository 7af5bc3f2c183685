"""The bookkeeping trail: one append-only Event row per state change, in its transaction."""

from __future__ import annotations

from sqlalchemy.orm import Session

from qgate.core.db.models import Event


def record(
    session: Session,
    stage: str,
    event: str,
    *,
    series_uid: str | None = None,
    detail: str | None = None,
) -> None:
    """Add an event row to ``session``; it commits (or not) with the state change it describes.

    The row names the node whose session factory made ``session``
    (:func:`qgate.core.db.make_session_factory`'s ``node``).
    """
    session.add(
        Event(
            stage=stage,
            event=event,
            series_instance_uid=series_uid,
            detail=detail,
            node=session.info.get("node"),
        )
    )
