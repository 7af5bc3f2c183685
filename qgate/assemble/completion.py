"""Series completion: decide when a series has stopped growing and queue it for scoring.

A series in ``receiving`` is complete when either

* ``series.stable_seconds`` have passed since its last instance, or
* every association that sent to it has been released (``open_associations == 0``), the
  release came after its last instance, and ``series.release_grace_seconds`` have passed.

The second rule lets a modality that sends one series per association get its result in
seconds instead of a minute. The grace period covers a modality that opens a second
association for the rest of the series. After a crash the in-memory association count is
lost, the stored count stays above zero, and only the first rule applies: slower, never
early. All state is in SQL, so completion survives a restart, and any number of
assemblers (one beside each receiver, on any node) may poll at once: each move is a
conditional UPDATE that only one of them wins.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import SeriesConfig, Settings
from qgate.core.db.models import Series, utcnow
from qgate.core.events import record
from qgate.score.queue import enqueue_score

log = logging.getLogger(__name__)


def _complete_clause(cfg: SeriesConfig, now: dt.datetime):  # type: ignore[no-untyped-def]
    stable = Series.last_received_at <= now - dt.timedelta(seconds=cfg.stable_seconds)
    released = and_(
        Series.open_associations <= 0,
        Series.released_at.is_not(None),
        Series.released_at >= Series.last_received_at,
        Series.last_received_at <= now - dt.timedelta(seconds=cfg.release_grace_seconds),
    )
    return and_(Series.status == "receiving", or_(stable, released))


def queue_complete_series(
    sessions: sessionmaker[Session], cfg: SeriesConfig, now: dt.datetime | None = None
) -> list[str]:
    """Move every complete series to ``queued`` and add its scoring job. Returns their UIDs."""
    now = now or utcnow()
    queued: list[str] = []
    with sessions() as session:
        candidates = session.execute(
            select(Series.series_instance_uid, Series.generation, Series.last_received_at).where(
                _complete_clause(cfg, now)
            )
        ).all()
        for uid, generation, last in candidates:
            # Guarded on generation and last arrival: an instance that lands in between
            # leaves the series receiving, and the next poll looks again.
            won = session.execute(
                update(Series)
                .where(
                    Series.series_instance_uid == uid,
                    Series.status == "receiving",
                    Series.generation == generation,
                    Series.last_received_at == last,
                )
                .values(status="queued")
            ).rowcount
            if won != 1:
                session.rollback()
                continue
            enqueue_score(session, series_uid=uid, generation=generation)
            record(
                session, "assemble", "complete", series_uid=uid, detail=f"generation {generation}"
            )
            session.commit()
            queued.append(uid)
    if queued:
        log.info("queued %d complete series for scoring", len(queued))
    return queued


class Assembler(threading.Thread):
    """Polls for complete series every ``series.poll_seconds`` and queues them."""

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
