"""One claim poll at a time while the queue is empty.

Every claimer of a worker process (each decode-ahead thread of each worker thread,
:mod:`qgate.score.prefetch`) claims through one :class:`IdlePoll`. While jobs come, each
claims at once. Once a claim finds the queue empty, only one claimer asks the database
again, after a delay that doubles from :data:`FIRST_DELAY` up to ``queue.poll_seconds``;
the others wait for it. When it claims a job, they all claim at once again, so a burst
of series is taken up in parallel.

An idle worker process thus issues one claim per ``queue.poll_seconds`` (0.5 s by
default), however many worker threads and series ahead it has, and a job queued on an
idle node is claimed within ``queue.poll_seconds`` (at most that, plus one claim).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The first wait after a claim found the queue empty, in seconds (capped at the poll).
FIRST_DELAY = 0.05


class IdlePoll:
    """Shared by the claimers of one worker process; see the module docstring.

    Parameters
    ----------
    poll_seconds : float
        The longest wait between two claims while the queue is empty.
    """

    def __init__(self, *, poll_seconds: float) -> None:
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self.poll_seconds = poll_seconds
        self._first = min(FIRST_DELAY, poll_seconds)
        self._cond = threading.Condition()
        self._empty = False  # the last claim found nothing
        self._polling = False  # a claimer holds the one poll
        self._delay = self._first
        self._found = 0  # claims that found a job: wakes the waiting claimers

    def claim(self, source: Callable[[], T | None], stop: threading.Event) -> T | None:
        """``source()``'s next item, waiting while the queue is empty; None once ``stop``
        is set. An exception from ``source`` is logged and counts as an empty queue."""
        while not stop.is_set():
            with self._cond:
                polling = self._empty
                if polling and self._polling:  # another claimer polls: wait for it
                    self._wait_for_poller(stop)
                    continue
                self._polling = polling
                delay = self._delay
            if polling and stop.wait(delay):
                with self._cond:
                    self._polling = False
                    self._cond.notify_all()
                break
            try:
                item = source()
            except Exception:
                log.exception("claiming failed; trying again")
                item = None
            with self._cond:
                if polling:
                    self._polling = False
                if item is not None:
                    self._empty, self._delay = False, self._first
                    self._found += 1
                elif polling:
                    self._delay = min(2 * self._delay, self.poll_seconds)
                elif not self._empty:
                    self._empty, self._delay = True, self._first
                self._cond.notify_all()
            if item is not None:
                return item
        return None

    def _wait_for_poller(self, stop: threading.Event) -> None:
        """With the lock held: until the poller claims a job or gives the poll up."""
        found = self._found
        self._cond.wait_for(
            lambda: self._found != found or not self._polling or stop.is_set(),
            timeout=self.poll_seconds,
        )

    def wake(self) -> None:
        """Have waiting claimers look at their stop events now."""
        with self._cond:
            self._cond.notify_all()
