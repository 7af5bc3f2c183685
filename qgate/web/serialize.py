"""Table rows -> API schemas (the pages use the same objects)."""

from __future__ import annotations

from typing import Any

from qgate.core.db.models import Result, Series
from qgate.web.crud import WorklistRow, verdict_public
from qgate.web.images import slice_indices
from qgate.web.schemas import (
    MapRef,
    ResultPublic,
    SeriesDetail,
    SeriesSummary,
    VerdictPublic,
)


def series_scores(scores: dict[str, Any] | None) -> dict[str, Any]:
    """A result's scores without the per-slice lists (the worklist's view)."""
    out: dict[str, Any] = {}
    for name, entry in (scores or {}).items():
        if isinstance(entry, dict):
            out[name] = {k: v for k, v in entry.items() if k != "slices"}
        else:
            out[name] = entry
    return out


def map_url(series_uid: str, result_id: int, index: int, *, thumb: bool = False) -> str:
    url = f"/api/series/{series_uid}/results/{result_id}/maps/{index}.png"
    return url + "?thumb=1" if thumb else url


def map_refs(result: Result, n_maps: int) -> list[MapRef]:
    uid = result.series_instance_uid
    return [
        MapRef(
            index=k,
            slice=s,
            url=map_url(uid, result.id, k),
            thumb_url=map_url(uid, result.id, k, thumb=True),
        )
        for k, s in enumerate(slice_indices(result.slices_scored, n_maps))
    ]


def _summary_fields(series: Series, result: Result | None) -> dict[str, Any]:
    reasons = list(result.reasons) if result is not None else []
    if series.status == "failed" and series.skip_reason:
        reasons.append(f"scoring failed: {series.skip_reason}")
    return {
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study_instance_uid,
        "patient_id": series.patient_id,
        "patient_name": series.patient_name,
        "study_date": series.study_date,
        "series_description": series.series_description,
        "modality": series.modality,
        "calling_aet": series.calling_aet,
        "status": series.status,
        "instances": series.instance_count,
        "held": series.held,
        "first_received_at": series.first_received_at,
        "last_received_at": series.last_received_at,
        "decision": result.decision if result is not None else None,
        "reasons": reasons,
        "scores": series_scores(result.scores if result is not None else None),
        "skipped_parts": list(result.skipped_parts) if result is not None else [],
        "error": series.skip_reason if series.status == "failed" else None,
        "result_id": result.id if result is not None else None,
        "scored_at": result.created_at if result is not None else None,
    }


def series_summary(row: WorklistRow) -> SeriesSummary:
    latest = (
        verdict_public(row.verdict, row.verdict_user or "?") if row.verdict is not None else None
    )
    return SeriesSummary(**_summary_fields(row.series, row.result), latest_verdict=latest)


def result_public(result: Result, n_maps: int) -> ResultPublic:
    return ResultPublic(
        id=result.id,
        generation=result.generation,
        decision=result.decision,
        reasons=list(result.reasons),
        scores=dict(result.scores),
        scorer_versions=dict(result.scorer_versions),
        slices_scored=result.slices_scored,
        seconds=result.seconds,
        created_at=result.created_at,
        maps=map_refs(result, n_maps),
    )


def series_detail(
    series: Series, result: Result | None, n_maps: int, verdicts: list[VerdictPublic]
) -> SeriesDetail:
    return SeriesDetail(
        **_summary_fields(series, result),
        latest_verdict=verdicts[0] if verdicts else None,
        generation=series.generation,
        result=result_public(result, n_maps) if result is not None else None,
        verdicts=verdicts,
    )
