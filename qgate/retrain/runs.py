"""The ``training_runs`` rows: start one, finish one, and mark failed the runs whose
process died.

A run whose process died (a crash, a shutdown mid-run) would stay ``running`` for ever:
:func:`recover_interrupted_runs` marks such runs failed, with the reason, when a new run
starts and when the service starts its scheduler. A running row records who runs it
(node, host, process ID and start time), so a run that another live process is still
running is left alone.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import socket
import threading
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db.models import TrainingRun, utcnow
from qgate.core.events import record
from qgate.core.storage import to_stored

log = logging.getLogger(__name__)
STAGE = "retrain"

Trigger = Literal["schedule", "cli", "web"]
#: How a run ended (``training_runs.status``; ``running`` until then).
RunStatus = Literal["promoted", "rejected", "failed"]

#: Runs that this process is running now (to tell its own live runs from dead ones).
_ACTIVE_RUNS: set[int] = set()
_ACTIVE_LOCK = threading.Lock()


def finite(o: Any) -> Any:
    """Strict JSON: non-finite numbers (a degenerate metric) become null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [finite(v) for v in o]
    return o


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_owner(settings: Settings) -> dict[str, Any]:
    """Who runs a run started here: recorded in the running row's ``metrics["owner"]``."""
    pid = os.getpid()
    return {
        "node": settings.node_name,
        "host": socket.gethostname(),
        "pid": pid,
        "start": _process_start(pid),
    }


def _owner_gone(run: TrainingRun, me: dict[str, Any]) -> str | None:
    """Why the process that started ``run`` is not running it any more; None if it may be."""
    owner = (run.metrics or {}).get("owner")
    if not isinstance(owner, dict) or not owner.get("pid"):
        return "its process is unknown"
    who = f"{owner.get('node')} (pid {owner['pid']} on {owner.get('host')})"
    if owner.get("host") != me["host"]:
        # Another machine: only this node's own runs are known dead (it restarted).
        return f"node {who} restarted" if owner.get("node") == me["node"] else None
    pid = int(owner["pid"])
    same_process = pid == me["pid"] and owner.get("start") == me["start"]
    if same_process:
        with _ACTIVE_LOCK:
            return None if run.id in _ACTIVE_RUNS else f"{who} stopped running it"
    # Another live process here (`qgate retrain --now` beside the service) keeps its run.
    alive = _pid_alive(pid) and owner.get("start") in (None, _process_start(pid))
    return None if alive else f"process {who} is gone"


def recover_interrupted_runs(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    found: str,
    stale_after: dt.timedelta | None = dt.timedelta(days=1),
) -> list[int]:
    """Mark failed the runs left ``running`` by a process that died; returns their IDs.

    A run is interrupted when it records no owner, when its process (same host) is gone or
    is this process without the run in hand, when its node restarted (same node name on
    another host), or when it has been running longer than ``stale_after`` (a run of
    another node that never came back; should that run finish after all, its outcome
    replaces the mark). ``found`` says when, for the reason: "at scheduler start".
    """
    me = run_owner(settings)
    now = utcnow()
    marked: list[int] = []
    with sessions() as s:
        for run in s.scalars(select(TrainingRun).where(TrainingRun.status == "running")):
            why = _owner_gone(run, me)
            if why is None and stale_after is not None and run.started_at < now - stale_after:
                why = f"it has been running since {run.started_at:%Y-%m-%d %H:%M} UTC"
            if why is None:
                continue
            run.status, run.promoted, run.finished_at = "failed", False, now
            run.promoted_models = []
            run.reason = f"interrupted: {why}; found {found}"
            record(s, STAGE, "interrupted", detail=f"run {run.id}: {run.reason}")
            marked.append(run.id)
        s.commit()
    for run_id in marked:
        log.warning("retraining run %s was interrupted; marked failed", run_id)
    return marked


def start_run(settings: Settings, sessions: sessionmaker[Session], *, trigger: Trigger) -> int:
    """A new ``running`` row owned by this process (in hand before it is visible)."""
    with sessions() as s:
        run = TrainingRun(trigger=trigger, status="running", metrics={"owner": run_owner(settings)})
        s.add(run)
        s.flush()
        run_id = run.id
        with _ACTIVE_LOCK:
            _ACTIVE_RUNS.add(run_id)
        record(s, STAGE, "started", detail=f"trigger {trigger}")
        s.commit()
    return run_id


def finish_run(
    settings: Settings,
    sessions: sessionmaker[Session],
    run_id: int,
    *,
    status: RunStatus,
    promoted_models: list[str],
    reason: str,
    metrics: dict[str, Any],
    candidate_version: str | None,
    current_version: str | None,
    artifacts: Path | None,
) -> None:
    """Record how the run ended, with its event row, in one transaction; let it go."""
    try:
        with sessions() as s:
            run = s.get(TrainingRun, run_id)
            assert run is not None
            run.status, run.reason = status, reason
            run.promoted_models = list(promoted_models)
            run.promoted = status == "promoted"
            run.candidate_version, run.current_version = candidate_version, current_version
            run.metrics = finite(metrics)
            run.artifacts_dir = (
                to_stored(artifacts, settings.storage.root) if artifacts is not None else None
            )
            run.finished_at = utcnow()
            record(s, STAGE, status, detail=f"run {run_id}: {reason}")
            s.commit()
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE_RUNS.discard(run_id)
