"""The dispatch stage: claim due outbox items and send each over one association.

:func:`run_once` drains what is due now; :class:`Dispatcher` is the thread ``qgate serve``
runs, calling it every ``dispatch.poll_seconds``. A stop request lets the item in flight
finish (and its outcome be recorded) before the thread exits.

While a send runs, its lease is renewed whenever a third of it has passed, so a large
series on a slow link is not re-claimed by another dispatcher mid-send; a dispatcher that
dies stops renewing and its item is re-claimed once the lease lapses.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback

from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db.models import OutboxItem, utcnow
from qgate.core.storage import to_local
from qgate.core.tls import client_context
from qgate.dispatch.outbox import (
    RetryPolicy,
    claim_due,
    destination_of,
    mark_failed,
    mark_sent,
    renew,
)
from qgate.dispatch.scu import SendResult, send_files

log = logging.getLogger(__name__)


def lease_seconds_for(settings: Settings) -> float:
    """How long a claim holds before another dispatcher may take the item over.

    Renewed during a send, so it only needs to outlast the longest gap between two files
    (one DIMSE timeout) with a margin.
    """
    return max(60.0, 3.0 * settings.archive.timeout)


def _send(
    settings: Settings,
    sessions: sessionmaker[Session],
    item: OutboxItem,
    *,
    owner: str,
    lease_seconds: float,
) -> SendResult:
    last_renewal = time.monotonic()

    def progress(done: int, total: int) -> None:
        nonlocal last_renewal
        if time.monotonic() - last_renewal < lease_seconds / 3:
            return
        with sessions() as session:
            if not renew(session, item, owner=owner, lease_seconds=lease_seconds):
                log.warning("outbox %d: lease lost after %d/%d files", item.id, done, total)
        last_renewal = time.monotonic()

    tls = settings.archive.tls
    return send_files(
        [to_local(p, settings.storage.root) for p in item.paths],
        destination_of(item),
        calling_aet=settings.archive.calling_ae_title,
        timeout=settings.archive.timeout,
        progress=progress,
        # Built per send: a renewed certificate or CA file is picked up without a restart.
        tls=client_context(tls) if tls.enabled else None,
        server_hostname=tls.server_hostname,
    )


def process_item(
    settings: Settings,
    sessions: sessionmaker[Session],
    item: OutboxItem,
    *,
    owner: str,
    lease_seconds: float,
) -> bool:
    """Send one claimed item and record the outcome. True if it was delivered."""
    policy = RetryPolicy.from_settings(settings.dispatch)
    try:
        result = _send(settings, sessions, item, owner=owner, lease_seconds=lease_seconds)
        ok, summary = result.ok, result.summary()
    except Exception as exc:  # a bug or an unexpected library error: retry like a failure
        log.exception("outbox %d: send raised", item.id)
        ok = False
        summary = f"send raised {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
    with sessions() as session:
        if ok:
            if not mark_sent(session, item, owner=owner, detail=summary):
                log.warning("outbox %d delivered, but its lease had passed to another", item.id)
            return True
        state = mark_failed(session, item, owner=owner, error=summary, policy=policy)
    if state is None:
        log.warning("outbox %d failed, but its lease had passed to another", item.id)
    else:
        log.warning(
            "outbox %d (series %s) now %s: %s", item.id, item.series_instance_uid, state, summary
        )
    return False


def run_once(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    owner: str,
    stop: threading.Event | None = None,
) -> int:
    """Claim and send items until none is due; returns how many were attempted.

    Items that fall due again during this pass (a short backoff) wait for the next pass,
    so one pass always ends. ``stop`` is checked between items.
    """
    lease = lease_seconds_for(settings)
    due_by = utcnow()
    attempted = 0
    while stop is None or not stop.is_set():
        with sessions() as session:
            item = claim_due(
                session,
                owner=owner,
                lease_seconds=lease,
                now=utcnow(),
                due_by=due_by,
                max_attempts=settings.dispatch.max_attempts,
            )
        if item is None:
            break
        attempted += 1
        process_item(settings, sessions, item, owner=owner, lease_seconds=lease)
    return attempted


class Dispatcher(threading.Thread):
    """Runs :func:`run_once` every ``dispatch.poll_seconds`` until :meth:`stop`."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *, owner: str) -> None:
        super().__init__(name="dispatcher", daemon=True)
        self.settings = settings
        self.sessions = sessions
        self.owner = owner
        self._stop_event = threading.Event()

    def stop(self) -> None:
        """Ask the thread to exit once the item in flight (if any) is recorded."""
        self._stop_event.set()

    def run(self) -> None:
        log.info("dispatcher %s started", self.owner)
        while not self._stop_event.is_set():
            try:
                run_once(self.settings, self.sessions, owner=self.owner, stop=self._stop_event)
            except Exception:  # the database may be briefly unavailable; keep polling
                log.exception("dispatch pass failed")
            self._stop_event.wait(self.settings.dispatch.poll_seconds)
        log.info("dispatcher %s stopped", self.owner)
