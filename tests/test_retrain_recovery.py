"""Retraining runs left "running" by a process that died are marked failed, with the
reason, when the scheduler starts or a new run starts; live runs are left alone.
On SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db.models import Event, TrainingRun, utcnow
from qgate.retrain import recover_interrupted_runs, run_retrain
from qgate.retrain.runs import _ACTIVE_RUNS, _process_start, run_owner
from qgate.web.app import create_app
from tests.support.web import add_user, login


def _running(sessions: sessionmaker[Session], owner: dict | None, *, age_h: float = 0) -> int:
    with sessions() as s:
        run = TrainingRun(
            trigger="schedule",
            status="running",
            metrics={} if owner is None else {"owner": owner},
            started_at=utcnow() - dt.timedelta(hours=age_h),
        )
        s.add(run)
        s.commit()
        return run.id


def _statuses(sessions: sessionmaker[Session]) -> dict[int, tuple[str, str | None]]:
    with sessions() as s:
        return {r.id: (r.status, r.reason) for r in s.scalars(select(TrainingRun))}


def test_ghost_runs_are_marked_failed_and_live_ones_kept(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    me = run_owner(settings)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        elsewhere = {"node": "node-b", "host": "other-host", "pid": 4242, "start": "1"}
        runs = {
            "no owner": _running(sessions, None),
            "dead process": _running(sessions, {**me, "pid": dead.pid, "start": "1"}),
            "this process, not running it": _running(sessions, me),
            "pid reused": _running(sessions, {**me, "start": "0"}),
            "node restarted elsewhere": _running(sessions, {**elsewhere, "node": me["node"]}),
            "stale, other node": _running(sessions, elsewhere, age_h=30),
        }
        ours = _running(sessions, me)
        _ACTIVE_RUNS.add(ours)  # as run_retrain does while it runs
        kept = {
            "this process, running it": ours,
            "live process here": _running(
                sessions, {**me, "pid": live.pid, "start": _process_start(live.pid)}
            ),
            "other node, recent": _running(sessions, elsewhere, age_h=2),
        }
        marked = recover_interrupted_runs(settings, sessions, found="at scheduler start")
        assert sorted(marked) == sorted(runs.values())
        after = _statuses(sessions)
        for what, run_id in runs.items():
            status, reason = after[run_id]
            assert status == "failed", what
            assert reason is not None and reason.startswith("interrupted: "), what
            assert reason.endswith("found at scheduler start"), what
        assert "restarted" in after[runs["node restarted elsewhere"]][1]
        assert "is gone" in after[runs["dead process"]][1]
        for what, run_id in kept.items():
            assert after[run_id] == ("running", None), what
        with sessions() as s:
            done = s.scalars(select(TrainingRun).where(TrainingRun.id.in_(marked)))
            assert all(r.finished_at is not None and not r.promoted for r in done)
            events = s.scalars(select(Event).where(Event.event == "interrupted")).all()
            assert len(events) == len(runs)
        # Idempotent: nothing more to mark.
        assert recover_interrupted_runs(settings, sessions, found="again") == []

        # A new run marks the ghosts of a dead process first, and keeps the live one.
        ghost = _running(sessions, {**me, "pid": dead.pid, "start": "1"})
        outcome = run_retrain(settings, sessions, trigger="cli")  # no labels: rejected
        after = _statuses(sessions)
        assert after[ghost][0] == "failed"
        assert after[ghost][1].endswith("found when a new run started")
        assert after[outcome.run_id][0] == "rejected"
        assert after[kept["live process here"]] == ("running", None)
    finally:
        _ACTIVE_RUNS.discard(ours)
        live.kill()
        live.wait()

    # The live process has stopped now, and this process let go of its run: ghosts too.
    recover_interrupted_runs(settings, sessions, found="at scheduler start")
    assert _statuses(sessions)[kept["live process here"]][0] == "failed"
    add_user(sessions, "rad", "radiologist")
    with TestClient(create_app(settings, sessions)) as client:
        login(client, "rad")
        page = client.get("/training").text
    # Ours is not in hand any more either: the six, the ghost, the live process's and ours.
    assert page.count("interrupted: ") == len(runs) + 3
    assert page.count("<b>running</b>") == 1  # the other node's recent run


def test_owner_is_this_process(settings: Settings) -> None:
    me = run_owner(settings)
    assert (me["pid"], me["host"], me["node"]) == (
        os.getpid(),
        socket.gethostname(),
        settings.node_name,
    )
    assert me["start"] is not None and me["start"].isdigit()
