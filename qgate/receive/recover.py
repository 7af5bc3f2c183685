"""Start-up reconciliation of the spool with the SQL store.

An instance is acknowledged only after its file is renamed into the spool and fsynced
and its row is committed. With SQLite in ``synchronous=NORMAL`` a power loss can still
drop the last commits, so the fsynced file is the source of truth: at start-up, spool
files newer than the newest recorded instance (minus a margin) that have no row are
recorded again, and temporary files left by an interrupted write are removed (they were
never acknowledged; with PostgreSQL, whose nodes share the spool, only those older than
``TMP_STALE``, as a younger one may be another node's write in progress). A file without
a row that does not read as a complete CT instance (a crash between the rename and the
fsync; never acknowledged either) is moved to ``<storage.root>/quarantine/`` rather than
deleted.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import time
from pathlib import Path

from pydicom.uid import UID
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db.models import Instance, utcnow
from qgate.core.spool import TMP_SUFFIX, discard
from qgate.receive.handlers import (
    Rejected,
    Undecodable,
    check_header,
    read_header,
    record_instance,
)

log = logging.getLogger(__name__)

#: Folder under ``storage.root`` for spool files that cannot be recovered.
QUARANTINE = "quarantine"

#: With a shared (PostgreSQL) store, temporary files older than this are left-overs.
TMP_STALE = dt.timedelta(minutes=10)

#: Files this much older than the newest recorded instance are assumed recorded.
MARGIN = dt.timedelta(minutes=10)


def recover_spool(settings: Settings, sessions: sessionmaker[Session]) -> int:
    """Record spool files that lost their row; returns how many were recorded."""
    root = settings.spool_dir
    if not root.is_dir():
        return 0
    with sessions() as session:
        newest = session.scalar(select(func.max(Instance.received_at)))
    since = (newest - MARGIN).timestamp() if newest is not None else 0.0
    # With a shared database the spool is shared too, and a temporary file may be another
    # node's write in progress: only stale ones are removed there.
    shared = sessions.kw["bind"].dialect.name != "sqlite"
    tmp_before = time.time() - TMP_STALE.total_seconds() if shared else math.inf
    recorded = 0
    for series_dir in os.scandir(root):
        if not series_dir.is_dir():
            continue
        for entry in os.scandir(series_dir.path):
            if entry.name.endswith(TMP_SUFFIX):
                if entry.stat().st_mtime < tmp_before:
                    discard(Path(entry.path))
                continue
            if not entry.name.endswith(".dcm") or entry.stat().st_mtime < since:
                continue
            if _record_orphan(settings, sessions, Path(entry.path)):
                recorded += 1
    if recorded:
        log.warning("recovered %d spooled instance(s) that had no database row", recorded)
    return recorded


def _record_orphan(settings: Settings, sessions: sessionmaker[Session], path: Path) -> bool:
    with sessions() as session:
        # The file is named after its SOP Instance UID: look it up on the unique index
        # (``instances.path`` has none; start-up may check thousands of files).
        if session.scalar(select(Instance.path).where(Instance.sop_instance_uid == path.stem)):
            return False
    data = path.read_bytes()
    try:
        ds = read_header(data)
        ts = UID(str(ds.file_meta.TransferSyntaxUID))
        header = check_header(
            ds,
            sop_class_uid=str(ds.file_meta.MediaStorageSOPClassUID),
            sop_instance_uid=str(ds.file_meta.MediaStorageSOPInstanceUID),
            transfer_syntax=ts,
            limits=settings.dicom,
        )
    except (Undecodable, Rejected, AttributeError) as exc:
        target = settings.storage.root / QUARANTINE / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        log.warning("spool file %s cannot be recovered (%s): moved to %s", path.name, exc, target)
        return False
    with sessions() as session:
        outcome = record_instance(
            session,
            header=header,
            transfer_syntax=str(ts),
            calling_aet="(recovered)",
            path=path,
            storage_root=settings.storage.root,
            tmp=path,
            size=len(data),
            new_for_association=False,
            fsync=settings.storage.fsync,
            now=utcnow(),
            node=settings.node_name,
        )
    return not outcome.duplicate
