"""The scoring stage: claim a job, score the series, write the report objects, queue sends.

Everything a job produces (result row, report files, outbox rows, series state, job
state) is committed in one transaction at the end, after checking that the job is still
ours and the series generation is unchanged. A series that grew meanwhile has a newer job;
this one's output is dropped, not half-applied.
"""

from __future__ import annotations

import logging
import shutil
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pydicom
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from qgate.config import Settings
from qgate.db.models import Instance, Job, Result, Series
from qgate.dispatch.outbox import Destination, enqueue
from qgate.events import record
from qgate.gate import apply_failure_policy, forward_originals
from qgate.pipeline import LEARNED_SCORERS, ScoredSeries, build_scorers, score_series
from qgate.queue import OnParked, claim, fail, finish, renew
from qgate.reporting import WrittenReport, write_report
from qgate.scoring import Scorer
from qgate.storage import to_local, to_stored
from qgate.volume import SeriesLoadError

log = logging.getLogger(__name__)
STAGE = "score"


@dataclass
class _Heartbeat:
    """Renews a job's lease in the background while a long scoring step runs."""

    sessions: sessionmaker[Session]
    job: Job
    owner: str
    lease_seconds: float

    @contextmanager
    def running(self) -> Iterator[None]:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease_seconds / 3):
                with self.sessions() as s:
                    if not renew(s, self.job, owner=self.owner, lease_seconds=self.lease_seconds):
                        log.warning("lost the lease on job %s", self.job.id)
                        return

        t = threading.Thread(target=beat, name=f"lease-{self.job.id}", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()


def _instance_paths(session: Session, series_uid: str, root: Path) -> list[Path]:
    rows = session.scalars(
        select(Instance.path)
        .where(Instance.series_instance_uid == series_uid, Instance.skip_reason.is_(None))
        .order_by(Instance.instance_number, Instance.id)
    )
    return [to_local(p, root) for p in rows]


def _on_parked(settings: Settings) -> OnParked:
    """The gate's failure policy, run in the transaction that parks a job."""
    return partial(apply_failure_policy, settings=settings)


def _start(session: Session, job: Job, owner: str, root: Path) -> list[Path] | None:
    """Mark the series as scoring; None if this job's generation is already stale."""
    n = session.execute(
        update(Series)
        .where(
            Series.series_instance_uid == job.series_instance_uid,
            Series.generation == job.generation,
        )
        .values(status="scoring")
    ).rowcount
    if n != 1:
        finish(session, job, owner=owner, detail="superseded before scoring")
        session.commit()
        return None
    record(
        session,
        STAGE,
        "started",
        series_uid=job.series_instance_uid,
        detail=f"job {job.id} generation {job.generation}",
    )
    session.commit()
    return _instance_paths(session, job.series_instance_uid, root)


def _commit_result(
    session: Session,
    settings: Settings,
    job: Job,
    owner: str,
    scored: ScoredSeries,
    written: WrittenReport,
) -> bool:
    root = settings.storage.root
    series = session.get(Series, job.series_instance_uid, populate_existing=True)
    if series is None or series.generation != job.generation:
        finish(session, job, owner=owner, detail="superseded while scoring")
        session.commit()
        return False
    previous = session.scalar(
        select(Result).where(
            Result.series_instance_uid == series.series_instance_uid, Result.superseded_by.is_(None)
        )
    )
    result = Result(
        series_instance_uid=series.series_instance_uid,
        generation=job.generation,
        decision=scored.decision.decision,
        reasons=list(scored.decision.reasons),
        scores=scored.scores_json,
        scorer_versions=dict(scored.versions),
        slices_scored=scored.loaded.volume.n_slices,
        seconds=round(scored.seconds, 3),
        sr_sop_instance_uid=written.sr_uid,
        sr_path=to_stored(written.paths[0], root),
        skipped_parts=[p.to_json() for p in written.skipped_parts],
    )
    session.add(result)
    session.flush()
    if previous is not None:
        previous.superseded_by = result.id
    for path, reason in scored.loaded.skipped:
        session.execute(
            update(Instance)
            .where(Instance.path == to_stored(path, root))
            .values(skip_reason=reason)
        )
    series.status = "scored"
    series.decision = scored.decision.decision
    series.skip_reason = None
    enqueue(
        session,
        series_uid=series.series_instance_uid,
        kind="results",
        paths=[to_stored(p, root) for p in written.paths],
        dest=Destination.from_settings(settings.archive),
    )
    for part in written.skipped_parts:
        record(
            session,
            STAGE,
            "part_skipped",
            series_uid=series.series_instance_uid,
            detail=part.describe(),
        )
    mode = settings.gate.mode
    if mode == "observe":
        pass
    elif series.forwarded_generation == series.generation:
        # A re-score of originals already sent (released, or sent on failure): the
        # archive has them, so they are neither sent again nor held.
        series.held = False
        record(
            session,
            "gate",
            "already_forwarded",
            series_uid=series.series_instance_uid,
            detail=f"generation {series.generation} was sent before this result",
        )
    elif mode == "forward" or scored.decision.decision == "pass":
        forward_originals(session, settings, series)
    else:
        series.held = True
        record(
            session,
            "gate",
            "held",
            series_uid=series.series_instance_uid,
            detail="flagged; waiting for `qgate release`",
        )
    record(
        session,
        STAGE,
        "scored",
        series_uid=series.series_instance_uid,
        detail=f"{scored.decision.decision} in {scored.seconds:.2f}s"
        + (f", supersedes result {previous.id}" if previous is not None else ""),
    )
    if not finish(session, job, owner=owner, detail=scored.decision.decision):
        session.rollback()
        return False
    session.commit()
    return True


def process_job(
    settings: Settings,
    sessions: sessionmaker[Session],
    job: Job,
    scorers: Sequence[Scorer],
    *,
    owner: str,
) -> str:
    """Run one claimed job to its end. Returns 'scored', 'superseded', 'queued' or 'parked'."""
    uid = job.series_instance_uid
    with sessions() as session:
        paths = _start(session, job, owner, settings.storage.root)
    if paths is None:
        return "superseded"
    out_dir = settings.outgoing_dir / uid / f"g{job.generation}-j{job.id}"
    try:
        with _Heartbeat(sessions, job, owner, settings.queue.lease_seconds).running():
            scored = score_series(paths, scorers, settings.gate.thresholds)
            with sessions() as session:
                prev_sr = _previous_sr(session, uid, settings.storage.root)
                # Reports so far, not the series generation: a re-score of the same
                # generation (`qgate rescore`) also supersedes, as report n + 1.
                reports = session.scalar(
                    select(func.count(Result.id)).where(Result.series_instance_uid == uid)
                )
            written = write_report(
                scored,
                out_dir,
                previous_sr=prev_sr,
                generation=int(reports or 0),
                fsync=settings.storage.fsync,
            )
        with sessions() as session:
            ok = _commit_result(session, settings, job, owner, scored, written)
        if not ok:
            shutil.rmtree(out_dir, ignore_errors=True)
            return "superseded"
        log.info("job %s: series scored: %s", job.id, scored.decision.decision)
        return "scored"
    except Exception as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        retryable = not isinstance(exc, SeriesLoadError)
        detail = f"{type(exc).__name__}: {exc}"
        log.warning("job %s failed: %s", job.id, detail)
        log.debug("%s", traceback.format_exc())
        with sessions() as session:
            return fail(
                session,
                job,
                owner=owner,
                error=detail,
                max_attempts=settings.queue.max_attempts,
                retryable=retryable,
                on_parked=_on_parked(settings),
            )


def _previous_sr(session: Session, series_uid: str, root: Path) -> pydicom.Dataset | None:
    stored = session.scalar(
        select(Result.sr_path).where(
            Result.series_instance_uid == series_uid, Result.superseded_by.is_(None)
        )
    )
    if stored and (path := to_local(stored, root)).exists():
        return pydicom.dcmread(path)
    return None


def work_once(
    settings: Settings, sessions: sessionmaker[Session], scorers: Sequence[Scorer], *, owner: str
) -> str | None:
    """Claim and run one job; None when the queue is empty."""
    with sessions() as session:
        job = claim(
            session,
            owner=owner,
            lease_seconds=settings.queue.lease_seconds,
            max_attempts=settings.queue.max_attempts,
            on_parked=_on_parked(settings),
        )
    if job is None:
        return None
    return process_job(settings, sessions, job, scorers, owner=owner)


class Worker(threading.Thread):
    """A scoring worker thread. ``stop()`` lets the current job finish."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        owner: str,
        scorers: Sequence[Scorer] | None = None,
    ) -> None:
        super().__init__(name=f"worker-{owner}", daemon=True)
        self.settings, self.sessions, self.owner = settings, sessions, owner
        # Scorers handed in are used as they are; built here, they follow the registry.
        self._hot_reload = scorers is None
        #: The registry version each configured learned scorer serves (hot reload).
        self.serving: dict[str, str] = {}
        if scorers is not None:
            self.scorers = list(scorers)
        else:
            self.scorers = []
            self.reload_if_changed()
        self._stop_event = threading.Event()

    def reload_if_changed(self) -> bool:
        """Rebuild the scorers if the registry's active versions changed; between jobs only.

        A promotion or rollback (:func:`qgate.registry.activate`) is served from the next
        job on; the job in progress finishes with the scorers it started with.
        """
        if not self._hot_reload:
            return False
        from qgate.registry import is_registered, serving_weights

        learned = [m for m in self.settings.scoring.scorers if m in LEARNED_SCORERS]
        with self.sessions() as session:
            serving = serving_weights(self.settings, session)
        wanted = {m: serving[m].version for m in learned}
        if self.scorers and wanted == self.serving:
            return False
        scoring = self.settings.scoring.model_copy(deep=True)
        for m in learned:
            if is_registered(serving[m]):
                getattr(scoring, m).weights = serving[m].path
        self.scorers = build_scorers(self.settings.model_copy(update={"scoring": scoring}))
        if self.serving:
            log.info("%s: reloaded scorers, now serving %s", self.owner, wanted)
        elif wanted:
            log.info("%s: serving %s", self.owner, wanted)
        self.serving = wanted
        return True

    def step(self) -> str | None:
        """Pick up a new model version if one was activated, then run one job."""
        try:
            self.reload_if_changed()
        except Exception:
            log.exception("%s: model reload failed; keeping %s", self.owner, self.serving)
        return work_once(self.settings, self.sessions, self.scorers, owner=self.owner)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                did = self.step()
            except Exception:
                log.exception("worker loop error")
                did = None
            if did is None:
                self._stop_event.wait(self.settings.queue.poll_seconds)
