"""Scheduled housekeeping: the nightly retraining (``retrain.cron``) and the retention
purge (``retention.cron``), each when enabled (APScheduler, one run of each at a time).

The worker stage hosts the scheduler, so every node that scores has one; each job runs
under a cluster-wide lock (:func:`qgate.core.db.lock.cluster_lock`), so one retraining and one
purge run per cluster at a time, whichever node's schedule fires first.
"""

from __future__ import annotations

import logging

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db.lock import cluster_lock

log = logging.getLogger(__name__)

PURGE_LOCK = "purge"


def scheduled_retrain(settings: Settings, sessions: sessionmaker[Session]) -> None:
    """The scheduler's retraining job: skipped while another process retrains."""
    from qgate.retrain import RetrainBusy, run_retrain

    try:
        run_retrain(settings, sessions, trigger="schedule")
    except RetrainBusy as exc:
        log.info("scheduled retraining skipped: %s", exc)


def scheduled_purge(settings: Settings, sessions: sessionmaker[Session]) -> None:
    """The scheduler's purge job: skipped while another process purges."""
    from qgate.housekeeping.retention import run_purge

    with cluster_lock(sessions.kw["bind"], PURGE_LOCK) as held:
        if not held:
            log.info("scheduled purge skipped: another qgate process is purging")
            return
        report = run_purge(settings, sessions)
    log.info("retention purge: %s", report.summary())


def start_scheduler(
    settings: Settings, sessions: sessionmaker[Session]
) -> BackgroundScheduler | None:
    """Start the jobs that are enabled; None when neither is."""
    if not (settings.retrain.enabled or settings.retention.enabled):
        return None
    scheduler = BackgroundScheduler(daemon=True)
    jobs = (
        ("retrain", settings.retrain.enabled, settings.retrain.cron, scheduled_retrain),
        ("purge", settings.retention.enabled, settings.retention.cron, scheduled_purge),
    )
    for job_id, enabled, cron, func in jobs:
        if not enabled:
            continue
        scheduler.add_job(
            func,
            CronTrigger.from_crontab(cron),
            args=(settings, sessions),
            id=job_id,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=3600,
        )
        log.info("%s scheduled on %r", job_id, cron)
    scheduler.start()
    return scheduler
