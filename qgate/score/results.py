"""The result object: what ``qgate results --json`` and ``qgate score --json`` print.

``{"series_instance_uid", "study_instance_uid", "status", "decision", "reasons", "scores"}``
with ``status`` one of receiving|queued|scoring|scored|failed. While a re-opened series is
being re-scored, ``decision``/``scores`` still show the last result and ``status`` says
that a newer one is coming.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from qgate.core.db.models import Result, Series


def current_result(session: Session, series_uid: str) -> Result | None:
    return session.scalar(
        select(Result).where(
            Result.series_instance_uid == series_uid, Result.superseded_by.is_(None)
        )
    )


def result_object(session: Session, series: Series) -> dict[str, Any]:
    res = current_result(session, series.series_instance_uid)
    reasons: list[str] = list(res.reasons) if res else []
    if series.status == "failed" and series.skip_reason:
        reasons = [*reasons, f"scoring failed: {series.skip_reason}"]
    return {
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study_instance_uid,
        "status": series.status,
        "decision": res.decision if res else None,
        "reasons": reasons,
        "scores": dict(res.scores) if res else {},
        "generation": series.generation,
        "instances": series.instance_count,
        "held": series.held,
        "slices_scored": res.slices_scored if res else 0,
        # Scorers and report objects the result left out (qgate.core.degrade.SkippedPart).
        "skipped_parts": list(res.skipped_parts) if res else [],
        "scored_at": res.created_at.isoformat() if res else None,
    }


def list_results(session: Session, series_uid: str | None = None) -> list[dict[str, Any]]:
    q = select(Series).order_by(Series.last_received_at.desc())
    if series_uid:
        q = q.where(Series.series_instance_uid == series_uid)
    return [result_object(session, s) for s in session.scalars(q)]
