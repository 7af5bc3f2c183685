"""``qgate serve``: every stage in one process, each on its own thread.

receive (pynetdicom SCP) -> assemble (completion poller) -> score (worker threads) ->
dispatch (outbox sender). Stages talk only through the SQL store, so any of them can move
to its own process or node later without changing the others.
"""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from qgate.assemble import queue_complete_series
from qgate.config import Settings
from qgate.db import make_engine, make_session_factory, upgrade
from qgate.dispatch.dispatcher import Dispatcher
from qgate.queue import release_owner
from qgate.receive import start_scp
from qgate.receive.recover import recover_spool
from qgate.worker import Worker

log = logging.getLogger(__name__)


class Assembler(threading.Thread):
    """Polls for complete series and queues them."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        super().__init__(name="assembler", daemon=True)
        self.settings, self.sessions = settings, sessions
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.settings.series.poll_seconds):
            try:
                queue_complete_series(self.sessions, self.settings.series)
            except Exception:  # keep polling; the database may come back
                log.exception("assembler poll failed")


def _start_web(settings: Settings, sessions: sessionmaker[Session]) -> object | None:
    """The review app on its thread. A port it cannot bind is logged, not fatal: the
    DICOM gate in front of the PACS keeps running without its review pages."""
    from qgate.web import start_web

    try:
        return start_web(settings, sessions)
    except OSError as exc:
        log.error(
            "review app not started: cannot listen on %s:%d: %s",
            settings.web.host,
            settings.web.port,
            exc,
        )
        return None


def _start_scheduler(settings: Settings, sessions: sessionmaker[Session]) -> object:
    """The nightly retraining on ``retrain.cron`` and the retention purge on
    ``retention.cron``, each when enabled (APScheduler, one run of each at a time)."""
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    scheduler = BackgroundScheduler(daemon=True)
    if settings.retrain.enabled:
        from qgate.retrain import run_retrain

        scheduler.add_job(
            run_retrain,
            CronTrigger.from_crontab(settings.retrain.cron),
            args=(settings, sessions),
            kwargs={"trigger": "schedule"},
            id="retrain",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=3600,
        )
        log.info("retraining scheduled on %r", settings.retrain.cron)
    if settings.retention.enabled:
        from qgate.retention import run_purge

        scheduler.add_job(
            run_purge,
            CronTrigger.from_crontab(settings.retention.cron),
            args=(settings, sessions),
            id="purge",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=3600,
        )
        log.info("retention purge scheduled on %r", settings.retention.cron)
    scheduler.start()
    return scheduler


@dataclass
class Service:
    settings: Settings
    engine: Engine | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _scp: object | None = None
    _web: object | None = None
    _scheduler: object | None = None

    def start(self) -> None:
        s = self.settings
        if s.archive.tls.enabled:
            # Fail at start, not at the first send, on a missing or mismatched file. The
            # SCP's context is built (and checked) when it starts below.
            from qgate.tls import client_context

            client_context(s.archive.tls)
        s.spool_dir.mkdir(parents=True, exist_ok=True)
        s.outgoing_dir.mkdir(parents=True, exist_ok=True)
        upgrade(s.database.url)
        self.engine = make_engine(s.database.url, echo=s.database.echo)
        sessions = make_session_factory(self.engine)
        owners = [f"{s.node_name}/worker-{i}" for i in range(s.queue.workers)]
        with sessions() as session:
            for owner in owners:
                n = release_owner(session, owner)
                if n:
                    log.info("requeued %d job(s) left running by %s", n, owner)
        self._threads = [
            Assembler(s, sessions),
            *(Worker(s, sessions, owner=o) for o in owners),
            Dispatcher(s, sessions, owner=f"{s.node_name}/dispatch"),
        ]
        for t in self._threads:
            t.start()
        recover_spool(s, sessions)
        from qgate.retrain import recover_interrupted_runs

        # Retraining runs left "running" by a process that died are marked failed.
        recover_interrupted_runs(s, sessions, found="at service start")
        self._scp = start_scp(s, sessions)
        if s.web.enabled:
            self._web = _start_web(s, sessions)
        if s.retrain.enabled or s.retention.enabled:
            self._scheduler = _start_scheduler(s, sessions)
        # Everything loaded so far lives as long as the process. Freezing it keeps the
        # cyclic GC's full collections from rescanning it (~200k objects with torch,
        # SQLAlchemy and pydicom loaded: ~50 ms per full collection on the dev VM, a
        # pause a sender would wait through).
        gc.freeze()
        log.info(
            "qgate serving %s on %s:%d (mode %s, database %s)",
            s.dicom.ae_title,
            s.dicom.host,
            s.dicom.port,
            s.gate.mode,
            self.engine.url.render_as_string(hide_password=True),
        )

    def stop(self) -> None:
        if self._scheduler is not None:
            # A run in progress is not waited for; the next start marks it interrupted.
            self._scheduler.shutdown(wait=False)  # type: ignore[attr-defined]
        if self._web is not None:
            self._web.stop()  # type: ignore[attr-defined]
        if self._scp is not None:
            self._scp.shutdown()  # type: ignore[attr-defined]
        for t in self._threads:
            t.stop()  # type: ignore[attr-defined]
        for t in self._threads:
            t.join(timeout=60)
        if self.engine is not None:
            self.engine.dispose()
        log.info("qgate stopped")
