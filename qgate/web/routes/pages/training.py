"""Training runs: the nightly retraining's runs (qgate.retrain) with both models' metrics
and plots (each run's held-out metrics over time, candidate against current, and each
run's fine-tuning loss curve), what each model kind serves now and every registered version
(qgate.core.registry); an admin activates (rolls back to) a version here, audited."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request, status
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from starlette.responses import Response

from qgate.core.db.models import TrainingRun
from qgate.core.families import ModelFamily, retrained
from qgate.core.registry import RegistryError, active_weights, list_versions
from qgate.report.render import format_value
from qgate.web import crud
from qgate.web.deps import AdminUser, CurrentUser, SessionDep, SettingsDep, client_addr
from qgate.web.plots import LineChart, LineData, line_chart
from qgate.web.routes.api.users import activate_model
from qgate.web.templating import flash, render

router = APIRouter(include_in_schema=False)

#: Metrics shown per model, in this order, when present.
METRICS = ("n", "overall", "plcc", "srocc", "krocc", "mae")

_TUNED, _REFIT = retrained("fine_tune"), retrained("refit_quality")

#: The comparison plots: the family, the title and where the value sits in a side's
#: metrics (the fine-tuned family's at the top, the refit family's under its name).
COMPARISONS: tuple[tuple[ModelFamily, str, tuple[str, ...]], ...] = (
    (
        _TUNED,
        f"{_TUNED.title} held-out Overall = |PLCC| + |SROCC| + |KROCC| (higher is better)",
        ("overall",),
    ),
    (_TUNED, f"{_TUNED.title} held-out MAE, scores 0-4 (lower is better)", ("mae",)),
    (
        _REFIT,
        f"{_REFIT.title} quality fit held-out MAE, scores 1-10 (lower is better)",
        (_REFIT.name, "mae"),
    ),
)
SIDES = (("candidate", "line-candidate"), ("current", "line-current"))
LOSSES = (("sup", "supervised", "line-sup"), ("pseudo", "pseudo-label", "line-pseudo"))


def _value(metrics: Any, path: Sequence[str]) -> float | None:
    for key in path:
        if not isinstance(metrics, dict):
            return None
        metrics = metrics.get(key)
    return float(metrics) if isinstance(metrics, int | float) else None


def _promoted(run: TrainingRun, family: ModelFamily) -> bool:
    """Whether the run promoted that family (the chest refit goes along only when not worse)."""
    return family.name in (run.promoted_models or [])


def comparison_charts(runs: Sequence[TrainingRun]) -> list[LineChart]:
    """Candidate and current model per run, oldest run left; promoted runs are marked."""
    done = sorted((r for r in runs if r.metrics.get("candidate")), key=lambda r: r.id)
    labels = [(float(i), f"#{r.id}") for i, r in enumerate(done)]
    charts = []
    for family, title, path in COMPARISONS:
        lines: list[LineData] = []
        for side, css in SIDES:
            points = []
            for i, r in enumerate(done):
                v = _value(r.metrics.get(side), path)
                tip = f"run {r.id}, {side}: {format_value(v) if v is not None else 'n/a'}"
                points.append((float(i), v, tip, side == "candidate" and _promoted(r, family)))
            lines.append((side, css, points))
        chart = line_chart(title, lines, x_labels=labels)
        if chart is not None:
            charts.append(chart)
    return charts


def loss_chart(run: TrainingRun) -> LineChart | None:
    """The run's fine-tuning loss per step (its stored curve, averaged to <= 100 points)."""
    curve = (run.metrics.get("candidate") or {}).get("loss_curve") or {}
    steps = int(curve.get("steps") or 0)
    lines: list[LineData] = []
    for key, name, css in LOSSES:
        values = curve.get(key) or []
        scale = steps / len(values) if steps and values else 1.0
        pts = [
            ((k + 1) * scale, v, f"{name} loss, step {round((k + 1) * scale)}: {v:.4g}", False)
            for k, v in enumerate(values)
            if isinstance(v, int | float)
        ]
        lines.append((name, css, pts))
    return line_chart(f"Run {run.id} loss", lines, width=300, height=110, left=40)


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
        charts=comparison_charts(runs),
        losses={r.id: loss_chart(r) for r in runs},
        serving={
            m: a.version for m, a in active_weights(session, root=settings.storage.root).items()
        },
        versions=list_versions(session),
        cron=settings.retrain.cron if settings.retrain.enabled else None,
    )


@router.post("/training/models/{version}/activate")
def activate_version(
    request: Request, settings: SettingsDep, session: SessionDep, user: AdminUser, version: str
) -> Response:
    """Serve ``version`` from the next scoring job on (audited). Admins only."""
    try:
        row, previous = activate_model(
            session,
            root=settings.storage.root,
            user=user,
            version=version,
            remote_addr=client_addr(request),
        )
    except (crud.NotFound, RegistryError) as exc:
        flash(request, "error", f"Not activated: {exc}")
    else:
        flash(request, "ok", f"{row.model}: now serving {row.version} (was {previous}).")
    return RedirectResponse("/training", status.HTTP_303_SEE_OTHER)
