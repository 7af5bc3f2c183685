"""One retraining run, start to finish, one per cluster at a time."""

from __future__ import annotations

import logging
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db.lock import cluster_lock
from qgate.retrain.child import run_training
from qgate.retrain.labels import NotEnoughData, export_request
from qgate.retrain.promote import register_and_promote
from qgate.retrain.runs import (
    RunStatus,
    Trigger,
    finish_run,
    finite,
    recover_interrupted_runs,
    start_run,
)

log = logging.getLogger(__name__)

#: The cluster-wide lock (:func:`qgate.core.db.lock.cluster_lock`) one retraining run holds.
RETRAIN_LOCK = "retrain"


class RetrainBusy(RuntimeError):
    """Another process (on this node or another sharing the database) is retraining."""


@dataclass
class RetrainOutcome:
    """What one run did; :meth:`to_json` is what ``qgate retrain --now --json`` prints."""

    run_id: int
    status: RunStatus
    promoted: bool
    reason: str
    promoted_models: list[str] = field(default_factory=list)
    candidate: dict[str, Any] = field(default_factory=dict)
    current: dict[str, Any] = field(default_factory=dict)
    candidate_version: str | None = None
    current_version: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Strict JSON: non-finite numbers (a degenerate metric) become null."""
        return finite(asdict(self))  # type: ignore[no-any-return]


def run_retrain(
    settings: Settings, sessions: sessionmaker[Session], *, trigger: Trigger
) -> RetrainOutcome:
    """Run one retraining (see :mod:`qgate.retrain`), one per cluster at a time.

    Raises
    ------
    RetrainBusy
        Another process sharing the database holds the retraining lock; nothing was run.
        Any other failure is recorded in the run, not raised.
    """
    with cluster_lock(sessions.kw["bind"], RETRAIN_LOCK) as held:
        if not held:
            raise RetrainBusy("another qgate process is retraining; this run was skipped")
        return _run_locked(settings, sessions, trigger=trigger)


def _run_locked(
    settings: Settings, sessions: sessionmaker[Session], *, trigger: Trigger
) -> RetrainOutcome:
    try:
        recover_interrupted_runs(settings, sessions, found="when a new run started")
    except Exception as exc:  # the new run matters more than the old runs' bookkeeping
        log.warning("could not check for interrupted retraining runs: %s", exc)
    run_id = start_run(settings, sessions, trigger=trigger)
    run_dir = settings.storage.root / "models" / f"run-{run_id}"
    try:
        outcome = _run(settings, sessions, run_id, run_dir)
    except NotEnoughData as exc:
        outcome = RetrainOutcome(run_id, "rejected", False, str(exc))
    except Exception as exc:
        log.warning("retraining run %s failed: %s", run_id, exc)
        log.debug("%s", traceback.format_exc())
        outcome = RetrainOutcome(run_id, "failed", False, f"{type(exc).__name__}: {exc}")
    finish_run(
        settings,
        sessions,
        run_id,
        status=outcome.status,
        promoted_models=outcome.promoted_models,
        reason=outcome.reason,
        metrics={"candidate": outcome.candidate, "current": outcome.current, "data": outcome.data},
        candidate_version=outcome.candidate_version,
        current_version=outcome.current_version,
        artifacts=run_dir if run_dir.exists() else None,
    )
    log.info("retraining run %s: %s (%s)", run_id, outcome.status, outcome.reason)
    return outcome


def _run(
    settings: Settings, sessions: sessionmaker[Session], run_id: int, run_dir: Path
) -> RetrainOutcome:
    """Export the labels, train in a child process, then compare, register and promote."""
    with sessions() as s:
        request, data = export_request(settings, s, run_id)
        s.commit()  # the serving weights, registered so that a promotion can roll back
    result = run_training(request, run_dir, settings.retrain)
    data.update(result.data.model_dump(exclude_none=True))
    p = register_and_promote(settings, sessions, request, result, run_dir, data)
    return RetrainOutcome(
        run_id=run_id,
        status="promoted" if p.promoted_models else "rejected",
        promoted=bool(p.promoted_models),
        reason=p.reason,
        promoted_models=p.promoted_models,
        candidate=p.candidate,
        current=p.current,
        candidate_version=p.candidate_version,
        current_version=p.current_version,
        data=data,
    )
