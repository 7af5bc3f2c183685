"""Event handlers of the receive stage (the C-STORE SCP).

Each handler takes the pynetdicom event plus a :class:`ReceiveContext`, bound as an extra
argument by :mod:`qgate.receive.scp`. The C-STORE handler does only cheap work on the
sender's thread: one header-only parse, one file write, one SQL transaction.

``handle_store`` (``evt.EVT_C_STORE``)
    Uses ``event.assoc.requestor.ae_title``, ``event.request.AffectedSOPClassUID``,
    ``event.request.AffectedSOPInstanceUID``, ``event.context.transfer_syntax`` and
    ``event.request.DataSet``: the dataset's bytes as received, parsed in place and
    written to the spool unchanged behind the File Meta header that
    ``event.encoded_dataset()`` would add (:mod:`qgate.receive.part10`; a deflated
    dataset goes through ``encoded_dataset()`` itself). Pixels are never decoded here.
    It reads these header attributes (:data:`HEADER_TAGS`): SOP Class/Instance UID,
    Study/Series Instance UID, Modality, Rows, Columns, Number of Frames, Samples per
    Pixel, Bits Allocated, Instance Number, Patient ID, Patient's Name, Study Date,
    Series Description and the presence and length of Pixel Data.

    Returns one of:

    * ``0x0000`` Success: the file is in the spool (atomic rename, then fsync if
      ``storage.fsync``; see :mod:`qgate.core.spool`) and the transaction that inserted its
      ``instances`` row, upserted its ``series`` row and appended its ``events`` row has
      committed. Also returned for a
      duplicate SOP Instance UID: the first copy is kept, no row is added, and a
      ``duplicate`` event is written.
    * ``0xA900`` Data Set does not match SOP Class: an invalid or mismatched UID, no Pixel
      Data, a Modality other than CT, Rows/Columns/Number of Frames of 0 or above the
      ``dicom.max_*`` limits, an unusable Bits Allocated or Samples per Pixel, or native
      Pixel Data whose length is not Rows x Columns x Frames x Samples x Bits Allocated / 8.
    * ``0xA700`` Out of resources: the spool write or the SQL transaction failed. Nothing
      is acknowledged that is not stored.
    * ``0xC210`` Cannot understand: the dataset (or a header value) cannot be decoded.
    * ``0xC211`` Cannot understand: any other error inside the handler.

``handle_echo`` (``evt.EVT_C_ECHO``)
    Uses ``event.assoc.requestor.ae_title``; returns ``0x0000``.

``handle_release`` (``evt.EVT_RELEASED``, ``evt.EVT_ABORTED``, ``evt.EVT_CONN_CLOSE``)
    Uses ``event.assoc`` and ``event.event.name``. For every series the association sent
    to, decrements ``series.open_associations`` (not below 0) and sets ``released_at``, in
    one transaction with a ``released``/``aborted``/``closed`` event per series. Runs once
    per association, whichever of the three events comes first; returns nothing. The
    peer closes the connection once it has the release response, and ``EVT_CONN_CLOSE``
    (the DUL's thread) can come before ``EVT_RELEASED`` (the association's): a close of
    an association already marked released (``event.assoc.is_released``, set before the
    response is sent by :class:`qgate.receive.reactor.LowLatencyAssociation`) is recorded
    as ``released``. With pynetdicom's own loop (``dicom.internals`` without
    ``reactor``), which marks it after sending, such a close may still read ``closed``.

``handle_rejected`` (``evt.EVT_REJECTED``)
    Logs the calling AE title of a refused association (for example not on
    ``dicom.allowed_calling_aets``); returns nothing.

Logs never carry PHI: a line names the calling AE, the SOP class, the status and a short
hash of the SOP Instance UID (:func:`uid_digest`), never patient name or ID.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage
from sqlalchemy import Connection, Engine, bindparam, case, func, insert, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import DicomConfig, Settings
from qgate.core.db.models import Event, Instance, Series, utcnow
from qgate.core.spool import discard, publish, spool_path, write_temp
from qgate.core.storage import to_stored
from qgate.core.uids import clean_uid
from qgate.receive.part10 import file_header

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.events import Event as PynetdicomEvent

    from qgate.receive.listener import AssociationSlots

LOGGER = logging.getLogger("qgate.receive")

STAGE = "receive"

# DIMSE statuses returned by handle_store (PS3.4 Annex B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
HANDLER_ERROR = 0xC211

# The receive stage's event vocabulary (``events.event`` with ``stage='receive'``).
EV_RECEIVED = "received"
EV_DUPLICATE = "duplicate"
EV_REOPENED = "reopened"
EV_RELEASED = "released"
EV_ABORTED = "aborted"
EV_CLOSED = "closed"  # connection closed without release or abort

CT_STORAGE_SOP_CLASSES: tuple[UID, ...] = (CTImageStorage, EnhancedCTImageStorage)

#: The only attributes the handler parses; everything else is skipped by the reader.
HEADER_TAGS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "Modality",
    "SeriesDescription",
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "InstanceNumber",
    "SamplesPerPixel",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "PixelData",
)

_HEADER_TAG_LIST = [Tag(k) for k in HEADER_TAGS]
_UNDEFINED_LENGTH = 0xFFFFFFFF
_BITS_ALLOCATED = frozenset({8, 16, 32})
_SAMPLES_PER_PIXEL = frozenset({1, 3})


class AssociationTracker:
    """Which series each open association has sent to (in memory only).

    Feeds ``series.open_associations``: the first instance of a series on an association
    increments it, the association's end decrements it. After a crash the counts may stay
    too high; that only means the assembler waits the full ``stable_seconds``.

    ``EVT_CONN_CLOSE`` comes from the socket thread and can overtake an instance still
    being stored on the association's thread, so an ended association is remembered:
    :meth:`add` then returns ``False`` and the caller undoes its own increment.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[Association, set[str]] = {}
        self._ended: weakref.WeakSet[Association] = weakref.WeakSet()

    def is_new(self, assoc: Association, series_uid: str) -> bool:
        with self._lock:
            return series_uid not in self._series.get(assoc, ())

    def add(self, assoc: Association, series_uid: str) -> bool:
        """Remember ``series_uid`` for ``assoc``; ``False`` if ``assoc`` has ended."""
        with self._lock:
            if assoc in self._ended:
                return False
            self._series.setdefault(assoc, set()).add(series_uid)
            return True

    def end(self, assoc: Association) -> set[str]:
        """Forget ``assoc`` and return its series (empty after the first call)."""
        with self._lock:
            self._ended.add(assoc)
            return self._series.pop(assoc, set())

    def __len__(self) -> int:
        with self._lock:
            return len(self._series)


@dataclass(frozen=True)
class ReceiveContext:
    """Dependencies of the receive handlers, bound to each handler as an extra argument."""

    settings: Settings
    sessions: sessionmaker[Session]
    logger: logging.Logger = LOGGER
    tracker: AssociationTracker = field(default_factory=AssociationTracker)
    #: The node-wide association limit when several processes receive (else None:
    #: pynetdicom's per-process ``maximum_associations`` applies).
    slots: AssociationSlots | None = None

    @cached_property
    def file_header_template(self) -> bool:
        """Whether the File Meta header comes from :mod:`qgate.receive.part10`'s template
        (else from pynetdicom's ``event.encoded_dataset()``)."""
        return "file_header" in self.settings.dicom.internals

    @cached_property
    def spool_root(self) -> Path:
        """Absolute spool root (``instances.path`` is stored relative to storage.root)."""
        return self.settings.spool_dir.absolute()

    @cached_property
    def engine(self) -> Engine:
        """The store's engine: the C-STORE transaction runs on a bare connection, which
        costs less per instance than an ORM session."""
        return self.sessions.kw["bind"]


@dataclass(frozen=True)
class InstanceHeader:
    """What the receive stage keeps from one instance's header (validated)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    rows: int
    columns: int
    frames: int
    instance_number: int | None
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    series_description: str | None


class Rejected(Exception):
    """An instance refused with a specific DIMSE status; ``reason`` is free of PHI."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Duplicate(Exception):
    """Raised inside the store transaction to roll it back when the SOP UID exists."""


def uid_digest(uid: object) -> str:
    """A short, stable hash of a UID for logs (never the UID itself)."""
    text = uid.decode("ascii", "replace") if isinstance(uid, bytes) else str(uid)
    return hashlib.sha256(text.strip("\x00 ").encode()).hexdigest()[:12]


# --- header -------------------------------------------------------------------------


class Undecodable(Exception):
    """The stream is not a DICOM dataset qgate can read (maps to 0xC210)."""


#: Values longer than this are skipped, not read: only Pixel Data's length is needed.
_DEFER_BYTES = 4096


def read_header(data: bytes) -> Dataset:
    """Parse only :data:`HEADER_TAGS` of a Part 10 byte string; pixels stay raw bytes.

    pydicom's reader is lenient: it stops quietly at garbage and hands back short values.
    So a stream that yields neither SOP Class nor SOP Instance UID, or an element shorter
    than its declared length (a truncated stream), is also refused here.

    Raises
    ------
    Undecodable
        For a stream that cannot be read, is truncated, or is not a dataset at all.
    """
    try:
        # No deferred reads here: pydicom inflates a deflated dataset into a stream of
        # its own, so the deferred-length check below would compare against the wrong
        # size. This path serves deflated datasets and start-up recovery only.
        ds = dcmread(BytesIO(data), specific_tags=list(HEADER_TAGS))
    except Exception as exc:
        raise Undecodable(type(exc).__name__) from None
    return _complete(ds, len(data))


def read_dataset_header(stream: BytesIO, transfer_syntax: UID) -> Dataset:
    """Parse only :data:`HEADER_TAGS` of a dataset as received (no file meta).

    ``stream`` is the C-STORE request's dataset buffer; it is read in place, not copied.
    A deflated dataset is parsed through :func:`read_header`. Raises like
    :func:`read_header`.
    """
    size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    try:
        ds = read_dataset(
            stream,
            transfer_syntax.is_implicit_VR,
            transfer_syntax.is_little_endian,
            defer_size=_DEFER_BYTES,
            specific_tags=_HEADER_TAG_LIST,
        )
    except Exception as exc:
        raise Undecodable(type(exc).__name__) from None
    finally:
        stream.seek(0)
    return _complete(ds, size)


def _complete(ds: Dataset, size: int) -> Dataset:
    if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
        raise Undecodable("no SOP Class or SOP Instance UID")
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts its elements
        elem = ds.get_item(tag, keep_deferred=True)  # nothing is converted or read here
        if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED_LENGTH:
            continue
        if elem.value is None:  # deferred: the declared length must be in the stream
            if elem.value_tell + elem.length > size:
                raise Undecodable("truncated")
        elif isinstance(elem.value, bytes) and len(elem.value) < elem.length:
            raise Undecodable("truncated")  # pydicom hands back the short read
    return ds


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip("\x00 ")
    return text[:limit] or None


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    return int(value)


def _uid(value: object, what: str) -> str:
    try:
        return clean_uid(value)
    except ValueError:
        raise Rejected(DATASET_MISMATCH, f"invalid {what}") from None


def check_header(
    ds: Dataset,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: UID,
    limits: DicomConfig,
) -> InstanceHeader:
    """Validate a parsed header against the request and the limits.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The header from :func:`read_header`.
    sop_class_uid, sop_instance_uid : str
        Affected SOP Class / Instance UID of the C-STORE request.
    transfer_syntax : pydicom.uid.UID
        The presentation context's transfer syntax.
    limits : qgate.core.config.DicomConfig
        Supplies ``max_rows``, ``max_columns`` and ``max_frames``.

    Raises
    ------
    Rejected
        With ``0xA900`` for any of the reasons in the module docstring.
    Exception
        Whatever pydicom raises converting a malformed value (the caller maps it to 0xC210).
    """
    sop_uid = _uid(sop_instance_uid, "Affected SOP Instance UID")
    if _uid(ds.get("SOPInstanceUID"), "SOP Instance UID") != sop_uid:
        raise Rejected(DATASET_MISMATCH, "SOP Instance UID differs from the request")
    sop_class = _uid(ds.get("SOPClassUID"), "SOP Class UID")
    if sop_class != sop_class_uid or sop_class not in CT_STORAGE_SOP_CLASSES:
        raise Rejected(DATASET_MISMATCH, "SOP Class UID differs from the request")
    study_uid = _uid(ds.get("StudyInstanceUID"), "Study Instance UID")
    series_uid = _uid(ds.get("SeriesInstanceUID"), "Series Instance UID")

    modality = _text(ds, "Modality", 16)
    if modality != "CT":
        raise Rejected(DATASET_MISMATCH, f"modality {modality or 'missing'} is not CT")

    pixels = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
    if pixels is None:
        raise Rejected(DATASET_MISMATCH, "no Pixel Data")

    try:
        rows = _int(ds, "Rows")
        columns = _int(ds, "Columns")
        frames = _int(ds, "NumberOfFrames", 1)
        samples = _int(ds, "SamplesPerPixel", 1)
        bits = _int(ds, "BitsAllocated")
    except (TypeError, ValueError):
        raise Rejected(DATASET_MISMATCH, "unreadable image dimensions") from None
    for name, value, limit in (
        ("Rows", rows, limits.max_rows),
        ("Columns", columns, limits.max_columns),
        ("Number of Frames", frames, limits.max_frames),
    ):
        if value is None or not 0 < value <= limit:
            raise Rejected(DATASET_MISMATCH, f"{name} {value} outside 1..{limit}")
    assert rows is not None and columns is not None and frames is not None
    if bits not in _BITS_ALLOCATED:
        raise Rejected(DATASET_MISMATCH, f"Bits Allocated {bits} not supported")
    if samples not in _SAMPLES_PER_PIXEL:
        raise Rejected(DATASET_MISMATCH, f"Samples per Pixel {samples} not supported")
    assert bits is not None and samples is not None

    length = pixels.length
    if transfer_syntax.is_encapsulated:
        if length != _UNDEFINED_LENGTH:
            raise Rejected(DATASET_MISMATCH, "compressed Pixel Data is not encapsulated")
    else:
        expected = rows * columns * frames * samples * bits // 8
        # Native Pixel Data is padded to an even length.
        if length not in (expected, expected + (expected % 2)):
            raise Rejected(DATASET_MISMATCH, f"Pixel Data has {length} bytes, want {expected}")

    try:
        instance_number = _int(ds, "InstanceNumber")
    except (TypeError, ValueError):
        instance_number = None
    study_date = _text(ds, "StudyDate", 8)
    return InstanceHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_uid,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        modality=modality,
        rows=rows,
        columns=columns,
        frames=frames,
        instance_number=instance_number,
        patient_id=_text(ds, "PatientID", 64),
        patient_name=_text(ds, "PatientName", 200),
        study_date=study_date if study_date and study_date.isdigit() else None,
        series_description=_text(ds, "SeriesDescription", 200),
    )


# --- SQL ------------------------------------------------------------------------------


_SERIES = Series.__table__
_INSTANCES = Instance.__table__
_EVENTS = Event.__table__


@dataclass(frozen=True)
class _Statements:
    """The store transaction's statements, built once per dialect; values come as binds."""

    upsert_series: Any
    insert_instance: Any
    reopen_series: Any
    insert_events: Any
    close_series: Any

    @classmethod
    def build(cls, dialect_insert: Callable[[Any], Any]) -> _Statements:
        col = _SERIES.c
        ins = dialect_insert(_SERIES)
        new = ins.excluded
        keep = ("patient_id", "patient_name", "study_date", "series_description")
        upsert = ins.on_conflict_do_update(
            index_elements=[col.series_instance_uid],
            set_={
                "instance_count": col.instance_count + new.instance_count,
                "open_associations": col.open_associations + new.open_associations,
                "last_received_at": new.last_received_at,
                "calling_aet": new.calling_aet,
                "updated_at": new.updated_at,
                **{k: func.coalesce(getattr(new, k), col[k]) for k in keep},
            },
        ).returning(col.status, col.instance_count)
        instance = (
            dialect_insert(_INSTANCES)
            .on_conflict_do_nothing(index_elements=[_INSTANCES.c.sop_instance_uid])
            .returning(_INSTANCES.c.id)
        )
        reopen = (
            update(_SERIES)
            .where(col.series_instance_uid == bindparam("uid"), col.status != "receiving")
            .values(status="receiving", generation=col.generation + 1, updated_at=bindparam("now"))
            .returning(col.generation)
        )
        close = (
            update(_SERIES)
            .where(col.series_instance_uid.in_(bindparam("uids", expanding=True)))
            .values(
                open_associations=case(
                    (col.open_associations > 0, col.open_associations - 1), else_=0
                ),
                released_at=bindparam("now"),
                updated_at=bindparam("now"),
            )
        )
        return cls(upsert, instance, reopen, insert(_EVENTS), close)


_SQL: dict[str, _Statements] = {
    "sqlite": _Statements.build(sqlite_insert),
    "postgresql": _Statements.build(postgresql_insert),
}


def _sql(db: Session | Connection) -> _Statements:
    dialect = (db.dialect if isinstance(db, Connection) else db.get_bind().dialect).name
    try:
        return _SQL[dialect]
    except KeyError:  # pragma: no cover - only SQLite and PostgreSQL are supported
        raise NotImplementedError(f"no upsert for dialect {dialect}") from None


@dataclass(frozen=True)
class StoreOutcome:
    duplicate: bool
    reopened: bool = False
    generation: int | None = None


def _event(
    series_uid: str, event: str, detail: str | None, now: dt.datetime, node: str | None
) -> dict[str, Any]:
    return {
        "at": now,
        "series_instance_uid": series_uid,
        "stage": STAGE,
        "event": event,
        "detail": detail,
        "node": node,
    }


def record_instance(
    session: Session | Connection,
    *,
    header: InstanceHeader,
    transfer_syntax: str,
    calling_aet: str,
    path: Path,
    storage_root: Path,
    tmp: Path,
    size: int,
    new_for_association: bool,
    fsync: bool,
    now: dt.datetime,
    node: str | None,
    fsync_directory: bool = False,
    drop_cache: bool = False,
) -> StoreOutcome:
    """Record one instance in one transaction and move its file into place.

    Upserts the series (count, last-received time, calling AE, patient/study fields and
    ``open_associations`` if ``new_for_association``), inserts the instance, re-opens a
    series that had left ``receiving`` (``generation += 1``), appends the events and only
    then renames ``tmp`` to ``path``, still inside the transaction: a file under its final
    name always belongs to the transaction that inserted its row. A duplicate SOP Instance
    UID rolls everything back and is recorded as a ``duplicate`` event instead. The row
    keeps ``path`` relative to ``storage_root`` (:mod:`qgate.core.storage`); the events name
    ``node``.

    Concurrent senders of one series serialise on the series row (PostgreSQL row lock,
    SQLite's single writer); ``ON CONFLICT`` makes the first instance's insert race-free.
    Should the commit itself fail after the rename, the file stays without a row: it is
    not acknowledged, and the sender's retry replaces it.
    """
    sql = _sql(session)
    uid = header.series_instance_uid
    try:
        with session.begin():
            status, count = session.execute(
                sql.upsert_series,
                {
                    "series_instance_uid": uid,
                    "study_instance_uid": header.study_instance_uid,
                    "patient_id": header.patient_id,
                    "patient_name": header.patient_name,
                    "study_date": header.study_date,
                    "series_description": header.series_description,
                    "modality": header.modality,
                    "calling_aet": calling_aet,
                    "status": "receiving",
                    "instance_count": 1,
                    "first_received_at": now,
                    "last_received_at": now,
                    "open_associations": 1 if new_for_association else 0,
                    "released_at": None,
                    "generation": 0,
                    "decision": None,
                    "held": False,
                    "skip_reason": None,
                    "updated_at": now,
                },
            ).one()
            inserted = session.execute(
                sql.insert_instance,
                {
                    "sop_instance_uid": header.sop_instance_uid,
                    "sop_class_uid": header.sop_class_uid,
                    "series_instance_uid": uid,
                    "transfer_syntax_uid": transfer_syntax,
                    "path": to_stored(path, storage_root),
                    "size": size,
                    "calling_aet": calling_aet,
                    "instance_number": header.instance_number,
                    "received_at": now,
                    "skip_reason": None,
                },
            ).scalar_one_or_none()
            if inserted is None:
                raise _Duplicate
            # The instance row is the per-instance record; the trail gets the series'
            # first instance, not every one (an extra insert on the hot path).
            events = [_event(uid, EV_RECEIVED, "first instance", now, node)] if count == 1 else []
            generation = None
            if status != "receiving":  # the upsert leaves status alone: re-open here
                generation = session.execute(
                    sql.reopen_series, {"uid": uid, "now": now}
                ).scalar_one_or_none()
                if generation is not None:
                    events.append(_event(uid, EV_REOPENED, f"generation={generation}", now, node))
            if events:
                session.execute(sql.insert_events, events)
            publish(tmp, path, fsync=fsync, fsync_directory=fsync_directory, drop_cache=drop_cache)
    except _Duplicate:
        with session.begin():
            session.execute(
                sql.insert_events, [_event(uid, EV_DUPLICATE, header.sop_instance_uid, now, node)]
            )
        return StoreOutcome(duplicate=True)
    return StoreOutcome(duplicate=False, reopened=generation is not None, generation=generation)


# --- handlers ---------------------------------------------------------------------------


def _log(ctx: ReceiveContext, level: int, status: int, event: PynetdicomEvent, what: str) -> None:
    if not ctx.logger.isEnabledFor(level):
        return
    request = event.request
    ctx.logger.log(
        level,
        "C-STORE %s status=0x%04X aet=%s sop_class=%s uid#=%s",
        what,
        status,
        event.assoc.requestor.ae_title,
        UID(str(request.AffectedSOPClassUID or "")).name,
        uid_digest(request.AffectedSOPInstanceUID or ""),
    )


def handle_store(event: PynetdicomEvent, ctx: ReceiveContext) -> int:
    """``evt.EVT_C_STORE``: spool and record one instance; see the module docstring."""
    try:
        return _store(event, ctx)
    except Exception as exc:  # never let one instance take the association down
        _log(ctx, logging.ERROR, HANDLER_ERROR, event, f"failed ({type(exc).__name__})")
        ctx.logger.debug("C-STORE handler error", exc_info=True)
        return HANDLER_ERROR


def _store(event: PynetdicomEvent, ctx: ReceiveContext) -> int:
    request = event.request
    transfer_syntax = UID(event.context.transfer_syntax)
    calling_aet = str(event.assoc.requestor.ae_title).strip()[:16]

    # The dataset is parsed and written from pynetdicom's receive buffer, not copied.
    stream: BytesIO = request.DataSet
    deflated = transfer_syntax.is_deflated
    data = event.encoded_dataset() if deflated else b""  # pydicom inflates Part 10 only
    try:
        ds = read_header(data) if deflated else read_dataset_header(stream, transfer_syntax)
    except Undecodable as exc:
        _log(ctx, logging.WARNING, CANNOT_UNDERSTAND, event, f"undecodable ({exc})")
        return CANNOT_UNDERSTAND
    try:
        header = check_header(
            ds,
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax=transfer_syntax,
            limits=ctx.settings.dicom,
        )
    except Rejected as rej:
        _log(ctx, logging.WARNING, rej.status, event, f"rejected ({rej.reason})")
        return rej.status
    except Exception as exc:
        _log(ctx, logging.WARNING, CANNOT_UNDERSTAND, event, f"undecodable ({type(exc).__name__})")
        return CANNOT_UNDERSTAND

    fsync = ctx.settings.storage.fsync
    path = spool_path(ctx.spool_root, header.series_instance_uid, header.sop_instance_uid)
    head = b""
    if not deflated and ctx.file_header_template:
        head = file_header(header.sop_class_uid, header.sop_instance_uid, transfer_syntax)
    elif not deflated:  # pynetdicom's own File Meta and a copy of the dataset
        data = event.encoded_dataset()
    # A view of the receive buffer, released before the handler returns (pynetdicom
    # cannot grow or free the buffer while it is exported).
    with memoryview(data) if data else stream.getbuffer() as body:
        size = len(head) + len(body)
        try:
            # The disk write runs while the transaction below does its statements.
            early = fsync and ctx.settings.storage.drop_page_cache
            tmp = write_temp(path, (head, body), fsync=fsync, start_writeback=early)
        except OSError as exc:
            reason = f"spool write failed ({exc.strerror})"
            _log(ctx, logging.ERROR, OUT_OF_RESOURCES, event, reason)
            return OUT_OF_RESOURCES

    new_for_assoc = ctx.tracker.is_new(event.assoc, header.series_instance_uid)
    try:
        with ctx.engine.connect() as conn:
            outcome = record_instance(
                conn,
                header=header,
                transfer_syntax=str(transfer_syntax),
                calling_aet=calling_aet,
                path=path,
                storage_root=ctx.settings.storage.root,
                tmp=tmp,
                size=size,
                new_for_association=new_for_assoc,
                fsync=fsync,
                fsync_directory=ctx.settings.storage.fsync_directory,
                drop_cache=ctx.settings.storage.drop_page_cache,
                now=utcnow(),
                node=ctx.settings.node_name,
            )
    except (SQLAlchemyError, OSError) as exc:
        _log(ctx, logging.ERROR, OUT_OF_RESOURCES, event, f"not recorded ({type(exc).__name__})")
        ctx.logger.debug("C-STORE record error", exc_info=True)
        return OUT_OF_RESOURCES
    finally:
        discard(tmp)  # a no-op once published

    if outcome.duplicate:
        _log(ctx, logging.INFO, SUCCESS, event, "duplicate kept first copy")
        return SUCCESS
    if new_for_assoc and not ctx.tracker.add(event.assoc, header.series_instance_uid):
        close_series(ctx, {header.series_instance_uid}, EV_CLOSED)
    if outcome.reopened:
        _log(ctx, logging.INFO, SUCCESS, event, f"re-opened series gen={outcome.generation}")
    else:
        _log(ctx, logging.DEBUG, SUCCESS, event, "stored")
    return SUCCESS


def handle_echo(event: PynetdicomEvent, ctx: ReceiveContext) -> int:
    """``evt.EVT_C_ECHO``: always Success."""
    ctx.logger.debug("C-ECHO from aet=%s", event.assoc.requestor.ae_title)
    return SUCCESS


_END_EVENTS = {"EVT_RELEASED": EV_RELEASED, "EVT_ABORTED": EV_ABORTED}


def close_series(ctx: ReceiveContext, series: set[str], kind: str) -> None:
    """One association stopped sending to ``series``: decrement the hint, stamp the time."""
    now = utcnow()
    try:
        with ctx.sessions() as session, session.begin():
            sql = _sql(session)
            session.execute(sql.close_series, {"uids": sorted(series), "now": now})
            node = ctx.settings.node_name
            events = [_event(u, kind, None, now, node) for u in sorted(series)]
            session.execute(sql.insert_events, events)
    except SQLAlchemyError as exc:
        # Only a hint: a stale count means the full stable_seconds applies.
        ctx.logger.error(
            "association end not recorded for %d series (%s)", len(series), type(exc).__name__
        )


def handle_release(event: PynetdicomEvent, ctx: ReceiveContext) -> None:
    """``evt.EVT_RELEASED`` / ``EVT_ABORTED`` / ``EVT_CONN_CLOSE``: close the release hint
    and free the association's slot."""
    if ctx.slots is not None:
        ctx.slots.release(event.assoc)
    series = ctx.tracker.end(event.assoc)
    if not series:
        return
    kind = _END_EVENTS.get(event.event.name, EV_CLOSED)
    if kind == EV_CLOSED and event.assoc.is_released:
        kind = EV_RELEASED  # the close that follows the release response came first
    close_series(ctx, series, kind)
    ctx.logger.debug(
        "association from aet=%s %s, %d series", event.assoc.requestor.ae_title, kind, len(series)
    )


def handle_rejected(event: PynetdicomEvent, ctx: ReceiveContext) -> None:
    """``evt.EVT_REJECTED``: log who was refused."""
    ctx.logger.warning("association rejected: aet=%s", event.assoc.requestor.ae_title)
