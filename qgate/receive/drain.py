"""Stopping a receiver: open associations get a bounded grace period, none is cut mid-write.

A receiver that is asked to stop (SIGTERM to ``qgate receive`` or ``qgate serve``)
accepts no new association at once, then lets the open ones go on for up to
``dicom.stop_grace_seconds``: a modality in the middle of a series finishes it and
releases, and every instance it is told was stored is stored. Associations still open
after that are aborted (A-ABORT; the sender retries what was not acknowledged, and an
instance it sends again is a duplicate, kept once). The stop then waits for each
association's thread to end (at most :data:`ABORT_WAIT_SECONDS`), so a C-STORE in hand
is written, fsynced and recorded, or not acknowledged, before the process disposes of its
database connections and exits.
"""

from __future__ import annotations

import logging
import time

from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

#: After the grace period: how long the aborted associations' threads get to finish the
#: C-STORE they are in (one file write, fsync and commit).
ABORT_WAIT_SECONDS = 10.0


def stop_server(server: ThreadedAssociationServer, *, grace_seconds: float) -> None:
    """Stop accepting on ``server``, then end its open associations (module docstring)."""
    server.shutdown()
    deadline = time.monotonic() + grace_seconds
    open_now = _open(server)
    if open_now:
        log.info(
            "stopping: waiting up to %g s for %d open association(s) to end",
            grace_seconds,
            len(open_now),
        )
    while open_now and time.monotonic() < deadline:
        time.sleep(0.05)
        open_now = _open(server)
    if not open_now:
        return
    log.warning(
        "stopping: %d association(s) still open after dicom.stop_grace_seconds=%g; aborted",
        len(open_now),
        grace_seconds,
    )
    for assoc in open_now:
        try:
            assoc.abort()
        except Exception:  # it ended meanwhile, or its socket is gone: it stops anyway
            log.debug("aborting %s failed", assoc.name, exc_info=True)
    deadline = time.monotonic() + ABORT_WAIT_SECONDS
    for assoc in open_now:
        assoc.join(timeout=max(0.0, deadline - time.monotonic()))
    if left := [a for a in open_now if a.is_alive()]:
        log.error(
            "stopping: %d association thread(s) still running %g s after the abort",
            len(left),
            ABORT_WAIT_SECONDS,
        )


def _open(server: ThreadedAssociationServer) -> list[Association]:
    return [a for a in server.active_associations if a.is_alive()]
