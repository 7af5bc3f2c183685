"""Request and response schemas of the JSON API (and the worklist filter shared with the
pages), kept apart from the table models in :mod:`qgate.core.db.models`."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qgate.core.degrade import PartKind, SkipReason
from qgate.web.users import Role

SCORE_KEY_PATTERN = r"^[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-.]+$"


class WorklistQuery(BaseModel):
    """Worklist filter. ``decision``: flag (default; flagged or failed series) | pass | all
    (every series, scored or not)."""

    model_config = ConfigDict(extra="ignore")

    decision: Literal["flag", "pass", "all"] = "flag"
    review: Literal["all", "pending", "done"] = Field(
        "all", description="pending: no verdict yet; done: reviewed"
    )
    date_from: dt.date | None = Field(None, description="received on or after (UTC day)")
    date_to: dt.date | None = Field(None, description="received on or before (UTC day)")
    calling_aet: str | None = Field(None, max_length=16)
    score: str | None = Field(
        None,
        pattern=SCORE_KEY_PATTERN,
        description="scorer.output to filter on, e.g. noise.noise_sigma_hu",
    )
    score_min: float | None = None
    score_max: float | None = None
    page: int = Field(1, ge=1)
    per_page: int | None = Field(None, ge=1, le=200)

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        """An empty form field means "no filter"."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v not in ("", None)}
        return data

    def query_string(self, **change: Any) -> str:
        """This filter as URL query parameters, with ``change`` applied (for links)."""
        from urllib.parse import urlencode

        values = {**self.model_dump(exclude_none=True), **change}
        defaults = {"decision": "flag", "review": "all", "page": 1}
        return urlencode(
            {k: v for k, v in values.items() if v is not None and defaults.get(k) != v}
        )


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    role: str
    active: bool
    created_at: dt.datetime
    last_login_at: dt.datetime | None


class UserCreate(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=8, max_length=1024)
    role: Role = "radiologist"


class Me(BaseModel):
    username: str
    role: str
    csrf_token: str = Field(description="send as X-CSRF-Token with every POST")


class VerdictCreate(BaseModel):
    agrees: bool = Field(description="agrees with the gate's decision (the flag, or the pass)")
    score: int = Field(ge=0, le=4, description="image quality, 0 non-diagnostic ... 4 excellent")
    comment: str | None = Field(None, max_length=4000)
    release: bool = Field(False, description="also release the held series to the archive")


class VerdictPublic(BaseModel):
    id: int
    series_instance_uid: str
    result_id: int
    decision: str
    agrees: bool
    score: int
    comment: str | None
    username: str
    created_at: dt.datetime


class VerdictRecorded(BaseModel):
    verdict: VerdictPublic
    released_instances: int | None = Field(
        None, description="instances queued for the archive, when the verdict released it"
    )


class ReleaseResult(BaseModel):
    series_instance_uid: str
    released_instances: int


class RescoreResult(BaseModel):
    series_instance_uid: str
    job_id: int = Field(description="the scoring job queued (or requeued, when it was parked)")


class ResubmitResult(BaseModel):
    series_instance_uid: str
    resubmitted: int = Field(description="dead-lettered sends queued again")


class SkippedPartPublic(BaseModel):
    """A scorer or report object the result left out, and why (qgate.core.degrade)."""

    kind: PartKind
    name: str
    reason: SkipReason
    detail: str


class MapRef(BaseModel):
    index: int
    slice: int = Field(description="0-based index of the scored slice the map shows")
    url: str
    thumb_url: str


class ResultPublic(BaseModel):
    id: int
    generation: int
    decision: str
    reasons: list[str]
    scores: dict[str, Any]
    scorer_versions: dict[str, Any]
    slices_scored: int
    seconds: float
    created_at: dt.datetime
    maps: list[MapRef]


class SeriesSummary(BaseModel):
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    series_description: str | None
    modality: str | None
    calling_aet: str | None
    status: str
    instances: int
    held: bool
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    decision: str | None
    reasons: list[str]
    scores: dict[str, Any] = Field(description="series-level outputs (per-slice lists left out)")
    skipped_parts: list[SkippedPartPublic] = Field(
        description="scorers and report objects the current result left out"
    )
    error: str | None = Field(description="why scoring failed, while status is failed")
    result_id: int | None
    scored_at: dt.datetime | None
    latest_verdict: VerdictPublic | None


class SeriesPage(BaseModel):
    items: list[SeriesSummary]
    total: int
    page: int
    per_page: int
    pages: int


class SeriesDetail(SeriesSummary):
    generation: int
    result: ResultPublic | None
    verdicts: list[VerdictPublic]


class AuditEntryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: dt.datetime
    username: str
    action: str
    series_instance_uid: str | None
    detail: dict[str, Any]
    remote_addr: str | None


class AuditPage(BaseModel):
    items: list[AuditEntryPublic]
    total: int
    page: int
    per_page: int
    pages: int


class Health(BaseModel):
    status: Literal["ok", "error"]
    database: str
    # "ok", or why new DICOM associations are refused (free space below the watermark).
    disk: str = "ok"
