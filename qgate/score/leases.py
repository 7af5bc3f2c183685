"""Keep the leases of the jobs a worker holds from lapsing while it decodes and scores."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from sqlalchemy.orm import Session, sessionmaker

from qgate.core.db.models import Job
from qgate.score.queue import renew

log = logging.getLogger(__name__)


class Leases:
    """Renews every job a worker holds (the one it scores and those it decoded ahead).

    One background thread, running while the context is entered, renews each held job
    every third of ``lease_seconds``. A job that is no longer ours (its lease lapsed and
    another worker claimed it, or it was finished) is dropped; the worker's commit checks
    ownership again, so lost work is dropped rather than applied twice. A database error
    is logged and the renewal tried again at the next beat.
    """

    def __init__(self, sessions: sessionmaker[Session], *, owner: str, lease_seconds: float):
        self.sessions, self.owner, self.lease_seconds = sessions, owner, lease_seconds
        self._held: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{owner}", daemon=True)

    def __enter__(self) -> Leases:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def hold(self, job: Job) -> None:
        with self._lock:
            self._held[job.id] = job

    def drop(self, job: Job) -> None:
        with self._lock:
            self._held.pop(job.id, None)

    def held(self) -> list[int]:
        """The ids of the jobs held now."""
        with self._lock:
            return sorted(self._held)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            with self._lock:
                jobs = list(self._held.values())
            for job in jobs:
                try:
                    with self.sessions() as s:
                        ours = renew(s, job, owner=self.owner, lease_seconds=self.lease_seconds)
                except Exception:
                    log.exception("renewing the lease on job %s failed; trying again", job.id)
                    continue
                if not ours:
                    with self._lock:
                        lost = self._held.pop(job.id, None) is not None
                    if lost:  # not finished and dropped meanwhile
                        log.warning("lost the lease on job %s", job.id)
