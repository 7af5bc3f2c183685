"""``/api/series``: the worklist, one series, its map images, verdicts, and the operator
actions release, rescore and resubmit (each audited)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status

from qgate.web import crud
from qgate.web.deps import (
    CurrentUser,
    ImagesDep,
    RadiologistUser,
    SessionDep,
    SettingsDep,
    StaffUser,
    client_addr,
)
from qgate.web.images import MapImageError, map_files
from qgate.web.schemas import (
    ReleaseResult,
    RescoreResult,
    ResubmitResult,
    SeriesDetail,
    SeriesPage,
    VerdictCreate,
    VerdictPublic,
    VerdictRecorded,
    WorklistQuery,
)
from qgate.web.serialize import series_detail, series_summary

router = APIRouter(prefix="/api/series", tags=["series"])


def _not_found(exc: crud.NotFound) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))


@contextmanager
def _action_errors() -> Iterator[None]:
    """An unknown series is 404; an action that does not fit its state is 409."""
    try:
        yield
    except crud.NotFound as exc:
        raise _not_found(exc) from exc
    except crud.Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc


@router.get("", response_model=SeriesPage)
def list_series(
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
    query: Annotated[WorklistQuery, Query()],
) -> SeriesPage:
    """The worklist: flagged series by default (``decision=all`` for every series), newest
    first, filtered and paginated."""
    per_page = query.per_page or settings.web.page_size
    rows, total = crud.list_series(session, query=query, per_page=per_page)
    return SeriesPage(
        items=[series_summary(r) for r in rows],
        total=total,
        page=query.page,
        per_page=per_page,
        pages=max(1, math.ceil(total / per_page)),
    )


@router.get("/{series_uid}", response_model=SeriesDetail)
def get_series(
    series_uid: str, session: SessionDep, settings: SettingsDep, user: CurrentUser
) -> SeriesDetail:
    """One series: header, current result (every scorer's outputs, per-slice values,
    reasons), its quality-map images and every verdict."""
    try:
        series = crud.get_series(session, series_uid=series_uid)
    except crud.NotFound as exc:
        raise _not_found(exc) from exc
    result = crud.current_result(session, series_uid=series_uid)
    n_maps = len(map_files(result.sr_path, settings.storage.root)) if result else 0
    verdicts = crud.verdicts_of(session, series_uid=series_uid)
    return series_detail(series, result, n_maps, verdicts)


@router.get(
    "/{series_uid}/results/{result_id}/maps/{index}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "PNG image"}},
)
def map_image(
    series_uid: str,
    result_id: int,
    index: int,
    session: SessionDep,
    settings: SettingsDep,
    images: ImagesDep,
    user: CurrentUser,
    thumb: bool = False,
) -> Response:
    """Quality map ``index`` of a result (the Secondary Capture qgate sent), as PNG;
    ``thumb=1`` crops the side panel and scales it down."""
    try:
        result = crud.get_result(session, series_uid=series_uid, result_id=result_id)
        data = images.png(map_files(result.sr_path, settings.storage.root), index, thumb=thumb)
    except (crud.NotFound, MapImageError) as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    # A result's files never change: the browser may keep the image (private: patient data).
    return Response(
        data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"}
    )


@router.get("/{series_uid}/verdicts", response_model=list[VerdictPublic])
def list_verdicts(series_uid: str, session: SessionDep, user: CurrentUser) -> list[VerdictPublic]:
    """Every verdict on the series, newest first."""
    return crud.verdicts_of(session, series_uid=series_uid)


@router.post(
    "/{series_uid}/verdicts", response_model=VerdictRecorded, status_code=status.HTTP_201_CREATED
)
def create_verdict(
    series_uid: str,
    body: VerdictCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: RadiologistUser,
) -> VerdictRecorded:
    """Record a verdict on the current result (audited); ``release`` also releases a
    series held in gate mode. Radiologists only."""
    with _action_errors():
        verdict, released = crud.record_verdict(
            session,
            settings=settings,
            user=user,
            series_uid=series_uid,
            data=body,
            remote_addr=client_addr(request),
        )
    return VerdictRecorded(verdict=verdict, released_instances=released)


@router.post("/{series_uid}/release", response_model=ReleaseResult)
def release_series(
    series_uid: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: StaffUser,
) -> ReleaseResult:
    """Forward a series held in gate mode to the archive (audited)."""
    with _action_errors():
        n = crud.release(
            session,
            settings=settings,
            user=user,
            series_uid=series_uid,
            remote_addr=client_addr(request),
        )
    return ReleaseResult(series_instance_uid=series_uid, released_instances=n)


@router.post("/{series_uid}/rescore", response_model=RescoreResult)
def rescore_series(
    series_uid: str, request: Request, session: SessionDep, user: StaffUser
) -> RescoreResult:
    """Score the series again (audited): its parked job is requeued, or a new job queued;
    the new result supersedes the current one. 409 while it is receiving or queued."""
    with _action_errors():
        job_id = crud.rescore(
            session, user=user, series_uid=series_uid, remote_addr=client_addr(request)
        )
    return RescoreResult(series_instance_uid=series_uid, job_id=job_id)


@router.post("/{series_uid}/resubmit", response_model=ResubmitResult)
def resubmit_series(
    series_uid: str, request: Request, session: SessionDep, user: StaffUser
) -> ResubmitResult:
    """Send the series' dead-lettered sends again (audited). 409 when there is none."""
    with _action_errors():
        n = crud.resubmit(
            session, user=user, series_uid=series_uid, remote_addr=client_addr(request)
        )
    return ResubmitResult(series_instance_uid=series_uid, resubmitted=n)
