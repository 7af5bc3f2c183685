"""Compare a training process's candidates with the serving weights, register them, and
promote the ones that win.

The comparison is on the held-out set the service chose. With at least
``retrain.min_correlation_items`` items and non-constant labels the metric is Overall =
|PLCC| + |SROCC| + |KROCC| (LDCTIQAC2023, higher is better), else MAE (lower is better).
The fine-tuned family (MD-IQA) is promoted only if it is better by more than
``retrain.margin``; the refit family's quality fit (Chest CT-IQA) goes along with a
promotion only if its held-out MAE (1-10 scale) is not worse than the current fit. Each
candidate becomes a :class:`~qgate.core.db.models.ModelVersion` (activated only when promoted,
so the worker reloads between jobs); which families a run promoted is recorded in
``training_runs.promoted_models``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.families import retrained
from qgate.core.registry import activate, register_version
from qgate.retrain.contract import TrainRequest, TrainResult
from qgate.retrain.runs import finite

#: Added to a promoted run's reason when the Chest CT-IQA refit was activated along with it
#: (for people; pages read ``training_runs.promoted_models``).
CHEST_PROMOTED = "Chest CT-IQA refit promoted too"


@dataclass
class Promotion:
    """What the comparison decided and what was registered."""

    promoted_models: list[str]
    reason: str
    candidate: dict[str, Any]
    current: dict[str, Any]
    candidate_version: str
    current_version: str


def decide(
    candidate: dict[str, Any], current: dict[str, Any], margin: float
) -> tuple[bool, str, str]:
    """(promote, metric, reason): Overall when both have it, else MAE."""
    if candidate.get("overall") is not None and current.get("overall") is not None:
        gain = candidate["overall"] - current["overall"]
        metric, a, b = "overall", candidate["overall"], current["overall"]
    else:
        gain = current["mae"] - candidate["mae"]
        metric, a, b = "mae", candidate["mae"], current["mae"]
    better = gain > margin
    verdict = "better" if better else "not better"
    return (
        better,
        metric,
        f"candidate {metric} {a:.4f} vs current {b:.4f} on {candidate['n']} held-out items: "
        f"{verdict} by more than the margin {margin:g} (gain {gain:+.4f})",
    )


def side_metrics(result: TrainResult) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's ``metrics["candidate"]`` and ``metrics["current"]`` (what the training
    page plots): the fine-tuned family's held-out metrics, its loss curve, and the refit
    family's under its name."""
    tuned, refit = result.mdiqa, result.chestiqa
    candidate: dict[str, Any] = {
        **tuned.candidate.model_dump(exclude_none=True),
        "train_losses": tuned.train_losses,
        "loss_curve": tuned.loss_curve.model_dump(exclude_none=True),
    }
    current: dict[str, Any] = tuned.current.model_dump(exclude_none=True)
    if refit is not None:
        name = retrained("refit_quality").name
        candidate[name] = {
            **refit.candidate.model_dump(exclude_none=True),
            "coef": refit.coef,
            "intercept": refit.intercept,
        }
        current[name] = refit.current.model_dump(exclude_none=True)
    return candidate, current


def register_and_promote(
    settings: Settings,
    sessions: sessionmaker[Session],
    request: TrainRequest,
    result: TrainResult,
    run_dir: Path,
    data: dict[str, Any],
) -> Promotion:
    """Register the candidates in ``run_dir``, decide, and activate the winners."""
    root, margin = settings.storage.root, settings.retrain.margin
    tuned, refit = retrained("fine_tune"), retrained("refit_quality")
    candidate, current = side_metrics(result)
    promote, metric, reason = decide(candidate, current, margin)
    # (family, weights file in the run dir, parent version, registry metrics)
    candidates = [
        (
            tuned,
            result.mdiqa.weights,
            request.mdiqa.version,
            finite({"candidate": candidate, "current": current, "metric": metric}),
        )
    ]
    if result.chestiqa is not None and request.chestiqa is not None:
        refit_metrics = {
            "candidate": candidate[refit.name],
            "current": current[refit.name],
            "metric": "mae",
        }
        candidates.append((refit, result.chestiqa.weights, request.chestiqa.version, refit_metrics))
    promoted: list[str] = []
    with sessions() as s:
        rows = {
            fam.name: register_version(
                s,
                model=fam.name,
                path=run_dir / weights,
                root=root,
                parent=parent,
                data_snapshot=data,
                metrics=metrics,
            )
            for fam, weights, parent, metrics in candidates
        }
        s.commit()
        version = rows[tuned.name].version
        refit_row = rows.get(refit.name)
        if promote:
            activate(s, version, root=root)
            promoted.append(tuned.name)
            if refit_row is not None and result.chestiqa is not None:
                if result.chestiqa.candidate.mae <= result.chestiqa.current.mae:
                    activate(s, refit_row.version, root=root)
                    promoted.append(refit.name)
                    reason += f"; {CHEST_PROMOTED}"
                else:
                    reason += f"; {refit.title} refit kept inactive (held-out MAE worse)"
    return Promotion(
        promoted_models=promoted,
        reason=reason,
        candidate=candidate,
        current=current,
        candidate_version=version,
        current_version=request.mdiqa.version,
    )
