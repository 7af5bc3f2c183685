"""Training runs: a place in the navigation for the nightly retraining's runs and model
registry (issue 5, second part). Until that lands it says so."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from qgate.web.deps import CurrentUser, SettingsDep
from qgate.web.templating import render

router = APIRouter(include_in_schema=False)


@router.get("/training")
def training_runs(request: Request, settings: SettingsDep, user: CurrentUser) -> Response:
    return render(
        request, "training.html", user=user, nav="training", scorers=settings.scoring.scorers
    )
