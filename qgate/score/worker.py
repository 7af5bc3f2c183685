"""The scoring stage: claim a job, score the series, write the report objects, queue sends.

A worker thread keeps the scoring device busy: while it scores one series it has already
claimed and decoded the next ones (``queue.prefetch``; :mod:`qgate.score.prefetch`), and
:class:`~qgate.score.leases.Leases` renews the lease of every job it holds. A job decoded
ahead does not count as an attempt while it waits (:func:`qgate.score.queue.set_aside`); when the
worker stops, such jobs are put back at once; when it dies, their leases lapse and any
worker takes them. The worker threads of a process share one copy of the models
(:class:`ServingModels`), and one :class:`~qgate.score.idle.IdlePoll`: while the queue
is empty the process claims once per ``queue.poll_seconds``, however many threads it has.

Everything a job produces (result row, report files, outbox rows, series state, job
state) is committed in one transaction at the end, after checking that the job is still
ours and the series generation is unchanged. A series that grew meanwhile has a newer job;
this one's output is dropped, not half-applied.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pydicom
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db.models import Instance, Job, Result, Series
from qgate.core.events import record
from qgate.core.storage import to_local, to_stored
from qgate.decide.gate import apply_failure_policy, forward_originals
from qgate.dispatch.outbox import Destination, enqueue
from qgate.report.write import WrittenReport, write_report
from qgate.score.idle import IdlePoll
from qgate.score.leases import Leases
from qgate.score.pipeline import LEARNED_SCORERS, ScoredSeries, build_scorers, score_loaded
from qgate.score.prefetch import Prefetcher, SeriesDecoder, adopt, pipeline_shape
from qgate.score.queue import OnParked, claim, count_attempt, fail, finish, release_owner, set_aside
from qgate.score.scorers import Scorer
from qgate.score.volume import LoadedSeries, SeriesLoadError, load_series

log = logging.getLogger(__name__)
STAGE = "score"


Decode = Callable[[Sequence[Path]], LoadedSeries]


@dataclass
class Prepared:
    """A claimed job with its series decoded, or the error that stopped the decode."""

    job: Job
    loaded: LoadedSeries | None
    error: Exception | None
    decode_seconds: float
    #: Decoded ahead and set aside (:func:`qgate.score.queue.set_aside`): its attempt is
    #: counted again when it starts.
    set_aside: bool = False


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


def _start(session: Session, job: Job, owner: str, *, aside: bool) -> str | None:
    """Mark the series as scoring, counting the attempt of a job set aside; None when the
    job goes on, else its outcome: 'superseded' (its generation is already stale) or
    'lost' (no longer ours: its lease lapsed while it waited)."""
    if aside and not count_attempt(session, job, owner=owner):
        session.rollback()
        log.warning("job %s: lost its lease while it waited; dropped", job.id)
        return "lost"
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
        return "superseded"
    record(
        session,
        STAGE,
        "started",
        series_uid=job.series_instance_uid,
        detail=f"job {job.id} generation {job.generation}",
    )
    session.commit()
    return None


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


def prepare_job(
    settings: Settings,
    sessions: sessionmaker[Session],
    job: Job,
    *,
    owner: str,
    decode: Decode = load_series,
    will_wait: Callable[[], bool] | None = None,
) -> Prepared:
    """Decode the series of a claimed job; never raises (an error is kept for the job).

    ``will_wait``, asked once the series is decoded: True when the job will wait for its
    worker (which is busy with another), so its attempt is set aside meanwhile.
    """
    t0 = time.perf_counter()
    try:
        with sessions() as session:
            paths = _instance_paths(session, job.series_instance_uid, settings.storage.root)
        loaded = decode(paths)
    except Exception as exc:
        return Prepared(job, None, exc, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    aside = False
    if will_wait is not None and will_wait():
        try:
            with sessions() as session:
                aside = set_aside(session, job, owner=owner)
        except Exception:  # it keeps counting; nothing else changes
            log.exception("job %s: could not set its attempt aside", job.id)
    return Prepared(job, loaded, None, seconds, set_aside=aside)


def run_prepared(
    settings: Settings,
    sessions: sessionmaker[Session],
    prepared: Prepared,
    scorers: Sequence[Scorer],
    *,
    owner: str,
) -> str:
    """Score a prepared job to its end (its lease kept by the caller).

    Returns 'scored', 'superseded', 'queued', 'parked' or 'lost'.
    """
    job = prepared.job
    uid = job.series_instance_uid
    with sessions() as session:
        outcome = _start(session, job, owner, aside=prepared.set_aside)
    if outcome is not None:
        return outcome
    out_dir = settings.outgoing_dir / uid / f"g{job.generation}-j{job.id}"
    try:
        if prepared.error is not None:
            raise prepared.error
        assert prepared.loaded is not None
        adopt(prepared.loaded.volume)
        scored = score_loaded(
            prepared.loaded,
            scorers,
            settings.gate.thresholds,
            decode_seconds=prepared.decode_seconds,
        )
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
            sr_source_images=settings.report.sr_source_images,
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


def process_job(
    settings: Settings,
    sessions: sessionmaker[Session],
    job: Job,
    scorers: Sequence[Scorer],
    *,
    owner: str,
    decode: Decode = load_series,
) -> str:
    """Run one claimed job to its end, decode included. Returns as :func:`run_prepared`."""
    with Leases(sessions, owner=owner, lease_seconds=settings.queue.lease_seconds) as leases:
        leases.hold(job)
        prepared = prepare_job(settings, sessions, job, owner=owner, decode=decode)
        return run_prepared(settings, sessions, prepared, scorers, owner=owner)


def _previous_sr(session: Session, series_uid: str, root: Path) -> pydicom.Dataset | None:
    stored = session.scalar(
        select(Result.sr_path).where(
            Result.series_instance_uid == series_uid, Result.superseded_by.is_(None)
        )
    )
    if stored and (path := to_local(stored, root)).exists():
        return pydicom.dcmread(path)
    return None


def claim_job(settings: Settings, sessions: sessionmaker[Session], *, owner: str) -> Job | None:
    """Claim the next job for ``owner`` under a lease; None when the queue is empty."""
    with sessions() as session:
        return claim(
            session,
            owner=owner,
            lease_seconds=settings.queue.lease_seconds,
            max_attempts=settings.queue.max_attempts,
            on_parked=_on_parked(settings),
        )


def work_once(
    settings: Settings,
    sessions: sessionmaker[Session],
    scorers: Sequence[Scorer],
    *,
    owner: str,
    decode: Decode = load_series,
) -> str | None:
    """Claim and run one job, one step after the other; None when the queue is empty."""
    job = claim_job(settings, sessions, owner=owner)
    if job is None:
        return None
    return process_job(settings, sessions, job, scorers, owner=owner, decode=decode)


class ServingModels:
    """The scorers of one worker process, shared by its worker threads: one copy of each
    model per process, whatever ``queue.workers`` is.

    Scorers handed in are used as they are; built here, they follow the registry and are
    rebuilt between jobs when its active versions change (:meth:`reload_if_changed`).
    Inference does not change a model, so threads score with the same scorers at once; a
    thread that reloads replaces the list, and a job in progress keeps the list it took.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        owner: str,
        scorers: Sequence[Scorer] | None = None,
    ) -> None:
        self.settings, self.sessions, self.owner = settings, sessions, owner
        self._hot_reload = scorers is None
        self._lock = threading.Lock()
        #: The registry version each configured learned scorer serves (hot reload).
        self.serving: dict[str, str] = {}
        self.scorers: list[Scorer] = list(scorers) if scorers is not None else []
        if scorers is None:
            self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        """Rebuild the scorers if the registry's active versions changed; between jobs only.

        A promotion or rollback (:func:`qgate.core.registry.activate`) is served from the next
        job on; the job in progress finishes with the scorers it started with.
        """
        if not self._hot_reload:
            return False
        with self._lock:
            from qgate.core.registry import is_registered, serving_weights

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


class Worker(threading.Thread):
    """A scoring worker thread. ``stop()`` lets the current job finish and puts back the
    jobs decoded ahead.

    ``models`` shares one set of scorers between the worker threads of a process; without
    it the worker builds its own (from ``scorers`` if given). ``idle`` shares the claim
    poll of an empty queue likewise (default: the worker's own).
    """

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        owner: str,
        scorers: Sequence[Scorer] | None = None,
        models: ServingModels | None = None,
        idle: IdlePoll | None = None,
    ) -> None:
        super().__init__(name=f"worker-{owner}", daemon=True)
        self.settings, self.sessions, self.owner = settings, sessions, owner
        if models is not None and scorers is not None:
            raise TypeError("pass scorers or models, not both")
        self.models = models or ServingModels(settings, sessions, owner=owner, scorers=scorers)
        self.idle = idle or IdlePoll(poll_seconds=settings.queue.poll_seconds)
        self._stop_event = threading.Event()

    @property
    def scorers(self) -> list[Scorer]:
        return self.models.scorers

    @property
    def serving(self) -> dict[str, str]:
        """The registry version each configured learned scorer serves."""
        return self.models.serving

    def reload_if_changed(self) -> bool:
        """:meth:`ServingModels.reload_if_changed`."""
        return self.models.reload_if_changed()

    def _reload(self) -> None:
        try:
            self.reload_if_changed()
        except Exception:
            log.exception("%s: model reload failed; keeping %s", self.owner, self.serving)

    def step(self) -> str | None:
        """Pick up a new model version if one was activated, then run one job (claim,
        decode and score it, one after the other)."""
        self._reload()
        return work_once(self.settings, self.sessions, self.scorers, owner=self.owner)

    def stop(self) -> None:
        self._stop_event.set()
        self.idle.wake()

    def run(self) -> None:
        shape = pipeline_shape(self.settings)
        decoder = SeriesDecoder(processes=shape.decode_processes, device=shape.device)
        try:
            if shape.prefetch == 0:
                self._run_one_at_a_time(decoder)
            else:
                self._run_ahead(decoder, shape.prefetch)
        finally:
            decoder.close()

    def _claim(self) -> Job | None:
        return claim_job(self.settings, self.sessions, owner=self.owner)

    def _run_one_at_a_time(self, decode: Decode) -> None:
        while (job := self.idle.claim(self._claim, self._stop_event)) is not None:
            # Between jobs (not while idle): a new model version is served from this one.
            self._reload()
            try:
                process_job(
                    self.settings, self.sessions, job, self.scorers, owner=self.owner, decode=decode
                )
            except Exception:
                log.exception("worker loop error on job %s", job.id)

    def _run_ahead(self, decode: Decode, depth: int) -> None:
        """Score one job while up to ``depth`` more are claimed and decoded."""
        settings, sessions, owner = self.settings, self.sessions, self.owner
        with Leases(sessions, owner=owner, lease_seconds=settings.queue.lease_seconds) as leases:
            self._score_ahead(decode, leases, depth)

    def _score_ahead(self, decode: Decode, leases: Leases, depth: int) -> None:
        settings, sessions, owner = self.settings, self.sessions, self.owner

        def source() -> Job | None:
            job = claim_job(settings, sessions, owner=owner)
            if job is not None:
                leases.hold(job)
            return job

        def will_wait() -> bool:
            return not ahead.reserve_consumer()

        def prepare(job: Job) -> Prepared:
            return prepare_job(
                settings, sessions, job, owner=owner, decode=decode, will_wait=will_wait
            )

        poll = settings.queue.poll_seconds
        ahead = Prefetcher(
            source, prepare, depth=depth, poll_seconds=poll, name=self.name, idle=self.idle
        )
        ahead.start()
        try:
            while not self._stop_event.is_set():
                prepared = ahead.get(timeout=poll)
                if prepared is None:
                    continue
                # Between jobs (not while idle): a new model version is served from this one.
                self._reload()
                try:
                    run_prepared(settings, sessions, prepared, self.scorers, owner=owner)
                except Exception:
                    log.exception("worker loop error on job %s", prepared.job.id)
                finally:
                    leases.drop(prepared.job)
        finally:
            left = ahead.close()
            for prepared in left:
                leases.drop(prepared.job)
            if left:
                with sessions() as session:
                    n = release_owner(session, owner, why="decoded ahead, put back at stop")
                log.info("%s: put back %d job(s) decoded ahead", owner, n)
