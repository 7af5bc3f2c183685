"""The series page: header, scorer outputs and reasons, what was skipped, per-slice strip
plots, the quality maps with a slice scroller and thumbnails, the verdict form, the operator
actions (release, rescore, resubmit) and the series' history."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, status
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from qgate.core.degrade import SkippedPart
from qgate.web import crud
from qgate.web.deps import CurrentUser, RadiologistUser, SessionDep, SettingsDep, StaffUser
from qgate.web.deps import client_addr as addr
from qgate.web.display import matching, output_label, output_unit, scorer_tables
from qgate.web.images import map_files, map_size, thumbnail_picks
from qgate.web.plots import strip_plot
from qgate.web.schemas import VerdictCreate
from qgate.web.security import local_path
from qgate.web.serialize import map_refs
from qgate.web.templating import flash, render

router = APIRouter(include_in_schema=False)


@router.get("/series/{series_uid}")
def series_page(
    series_uid: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
) -> Response:
    try:
        series = crud.get_series(session, series_uid=series_uid)
    except crud.NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    result = crud.current_result(session, series_uid=series_uid)
    thresholds = list(settings.gate.thresholds)
    tables = scorer_tables(result.scores, thresholds) if result else []
    plots = [
        p
        for t in tables
        for key, values in t.slices.items()
        if (
            p := strip_plot(
                t.name,
                key,
                values,
                title=f"{output_label(key)} ({t.name})",
                unit=output_unit(key),
                thresholds=matching(thresholds, t.name, key),
            )
        )
        is not None
    ]
    files = map_files(result.sr_path, settings.storage.root) if result else []
    maps = map_refs(result, len(files)) if result else []
    thumbs = [maps[k] for k in thumbnail_picks(len(maps))]
    return render(
        request,
        "series.html",
        user=user,
        nav="worklist",
        series=series,
        result=result,
        tables=tables,
        plots=plots,
        maps=maps,
        thumbs=thumbs,
        map_size=map_size(files),
        verdicts=crud.verdicts_of(session, series_uid=series_uid),
        skipped=[SkippedPart.from_json(p) for p in result.skipped_parts] if result else [],
        dead_sends=crud.dead_sends(session, series_uid=series_uid),
        trail=crud.series_trail(session, series_uid=series_uid),
        back=local_path(request.query_params.get("back")),
    )


def _back(series_uid: str) -> RedirectResponse:
    return RedirectResponse(f"/series/{series_uid}", status.HTTP_303_SEE_OTHER)


@router.post("/series/{series_uid}/verdict")
def submit_verdict(
    series_uid: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: RadiologistUser,
    agrees: Annotated[str, Form(pattern="^(yes|no)$")],
    score: Annotated[int, Form(ge=0, le=4)],
    comment: Annotated[str, Form(max_length=4000)] = "",
    action: Annotated[str, Form()] = "save",
) -> Response:
    data = VerdictCreate(
        agrees=agrees == "yes", score=score, comment=comment, release=action == "release"
    )
    try:
        verdict, released = crud.record_verdict(
            session,
            settings=settings,
            user=user,
            series_uid=series_uid,
            data=data,
            remote_addr=addr(request),
        )
    except crud.NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except crud.Conflict as exc:
        flash(request, "error", f"Verdict not saved: {exc}")
        return _back(series_uid)
    text = f"Verdict saved: {'agrees' if verdict.agrees else 'disagrees'}, score {verdict.score}."
    if released is not None:
        text += f" Released to the archive ({released} instances queued)."
    flash(request, "ok", text)
    return _back(series_uid)


def _operator_action(
    request: Request,
    series_uid: str,
    run: Callable[[], int],
    *,
    done: Callable[[int], str],
    refused: str,
) -> Response:
    """Run an audited action (a crud call), flash its outcome, back to the series page."""
    try:
        n = run()
    except crud.NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except crud.Conflict as exc:
        flash(request, "error", f"{refused}: {exc}")
        return _back(series_uid)
    flash(request, "ok", done(n))
    return _back(series_uid)


@router.post("/series/{series_uid}/release")
def release(
    series_uid: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: StaffUser,
) -> Response:
    return _operator_action(
        request,
        series_uid,
        lambda: crud.release(
            session, settings=settings, user=user, series_uid=series_uid, remote_addr=addr(request)
        ),
        done=lambda n: f"Released to the archive: {n} instances queued.",
        refused="Not released",
    )


@router.post("/series/{series_uid}/rescore")
def rescore(series_uid: str, request: Request, session: SessionDep, user: StaffUser) -> Response:
    return _operator_action(
        request,
        series_uid,
        lambda: crud.rescore(session, user=user, series_uid=series_uid, remote_addr=addr(request)),
        done=lambda job_id: f"Queued for scoring again (job {job_id}).",
        refused="Not queued",
    )


@router.post("/series/{series_uid}/resubmit")
def resubmit(series_uid: str, request: Request, session: SessionDep, user: StaffUser) -> Response:
    return _operator_action(
        request,
        series_uid,
        lambda: crud.resubmit(session, user=user, series_uid=series_uid, remote_addr=addr(request)),
        done=lambda n: f"Resubmitted {n} failed send(s) to the archive.",
        refused="Not resubmitted",
    )
