"""``qgate worker``: ``queue.workers`` scoring threads, and the scheduled housekeeping.

Worker threads are named ``<node_name>/worker-<slot>.<i>``. At start the process puts back
the jobs its own names still hold (left running by this slot's previous process: a crash
or a kill), so they are scored again at once; jobs of workers elsewhere come back when
their leases lapse. Two worker processes on one node therefore need different ``--slot``
numbers (``qgate serve`` runs slot 0).
"""

from __future__ import annotations

import logging

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine

from qgate.core.config import Settings
from qgate.core.stage import StageName, open_store
from qgate.housekeeping.schedule import start_scheduler
from qgate.score.idle import IdlePoll
from qgate.score.queue import release_owner
from qgate.score.worker import ServingModels, Worker

log = logging.getLogger(__name__)


def worker_owners(settings: Settings, slot: int) -> list[str]:
    """The lease owner names of worker process ``slot`` on this node."""
    return [f"{settings.node_name}/worker-{slot}.{i}" for i in range(settings.queue.workers)]


class WorkerStage:
    name: StageName = "worker"

    def __init__(self, settings: Settings, *, slot: int = 0) -> None:
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}")
        self.settings, self.slot = settings, slot
        self._engine: Engine | None = None
        self._workers: list[Worker] = []
        self._scheduler: BackgroundScheduler | None = None

    def start(self) -> None:
        s = self.settings
        s.outgoing_dir.mkdir(parents=True, exist_ok=True)
        self._engine, sessions = open_store(s)
        owners = worker_owners(s, self.slot)
        with sessions() as session:
            for owner in owners:
                n = release_owner(session, owner)
                if n:
                    log.info("requeued %d job(s) left running by %s", n, owner)
        # One copy of the models for the process, shared by its worker threads.
        models = ServingModels(s, sessions, owner=f"{s.node_name}/worker-{self.slot}")
        # One claim poll while the queue is empty, for all of them (qgate/score/idle.py).
        idle = IdlePoll(poll_seconds=s.queue.poll_seconds)
        self._workers = [Worker(s, sessions, owner=o, models=models, idle=idle) for o in owners]
        for w in self._workers:
            w.start()
        from qgate.retrain import recover_interrupted_runs

        # Retraining runs left "running" by a process that died are marked failed.
        recover_interrupted_runs(s, sessions, found="at worker start")
        self._scheduler = start_scheduler(s, sessions)

    def stop(self) -> None:
        if self._scheduler is not None:
            # A run in progress is not waited for; the next start marks it interrupted.
            self._scheduler.shutdown(wait=False)
        for w in self._workers:
            w.stop()
        for w in self._workers:
            w.join(timeout=300)
        if self._engine is not None:
            self._engine.dispose()
