"""Training runs: the nightly retraining's runs (qgate.retrain) with both models' metrics,
and what each model kind serves now (qgate.registry)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import select
from starlette.responses import Response

from qgate.db.models import TrainingRun
from qgate.registry import active_weights
from qgate.web.deps import CurrentUser, SessionDep, SettingsDep
from qgate.web.templating import render

router = APIRouter(include_in_schema=False)

#: Metrics shown per model, in this order, when present.
METRICS = ("n", "overall", "plcc", "srocc", "krocc", "mae")


@router.get("/training")
def training_runs(
    request: Request, settings: SettingsDep, session: SessionDep, user: CurrentUser
) -> Response:
    runs = list(session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(50)))
    return render(
        request,
        "training.html",
        user=user,
        nav="training",
        scorers=settings.scoring.scorers,
        runs=runs,
        metrics=METRICS,
        serving={m: a.version for m, a in active_weights(session).items()},
        cron=settings.retrain.cron if settings.retrain.enabled else None,
    )
