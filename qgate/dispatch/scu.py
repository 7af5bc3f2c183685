"""C-STORE SCU: send a set of files to one destination over ONE association.

Presentation contexts come from the files themselves. For every SOP class among the files
we propose each non-native transfer syntax found (a JPEG original keeps its syntax when the
archive takes it) plus one context offering Explicit and Implicit VR Little Endian. Then,
file by file:

* an accepted context with the file's own syntax: the dataset goes as read from disk;
* only an uncompressed context: pynetdicom re-encodes uncompressed, deflated data between
  explicit and implicit VR; compressed pixel data is decompressed first, keeping the SOP
  Instance UID (a change of transfer syntax is not a new instance);
* no context for the SOP class at all: that file fails, the others still go.

Statuses 0x0000 and the storage warnings 0xB000, 0xB006, 0xB007 count as stored; any other
status, a missing response, or an association that is rejected, aborted or times out is a
failure with a message that names the destination and the cause. Logs carry UIDs and
paths only, never patient data.

With ``tls`` the association runs over TLS (``AE.associate(tls_args=...)``): the
archive's certificate is verified by the context (:func:`qgate.core.tls.client_context`), and a
failed handshake is an association failure like a refused connection.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from qgate.core.config import ArchiveConfig

log = logging.getLogger(__name__)

# Success, plus the C-STORE warnings that still mean "the archive kept it" (PS3.4 B.2.3).
STORED_STATUSES: frozenset[int] = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
NATIVE_SYNTAXES: tuple[UID, UID] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# PS3.8: presentation context IDs are odd numbers 1-255.
MAX_CONTEXTS = 128

ProgressFn = Callable[[int, int], None]
NOT_SENT = "not sent"


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP: the AE title to call and where it listens."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def from_settings(cls, archive: ArchiveConfig) -> Destination:
        return cls(ae_title=archive.ae_title, host=archive.host, port=archive.port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file. ``status`` is None when no C-STORE response came back."""

    path: str
    stored: bool
    sop_instance_uid: str | None = None
    status: int | None = None
    transfer_syntax: str | None = None
    message: str = ""


@dataclass(frozen=True)
class SendResult:
    """The outcome of one :func:`send_files` call (one association at most).

    ``error`` is set when the association itself failed (connect, reject, abort, timeout);
    per-file failures are in ``files``. ``associations`` counts association requests
    made: 0 (nothing readable to send) or 1.
    """

    dest: Destination
    files: tuple[FileOutcome, ...] = ()
    error: str | None = None
    associations: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and all(f.stored for f in self.files)

    @property
    def stored_count(self) -> int:
        return sum(f.stored for f in self.files)

    @property
    def failed(self) -> tuple[FileOutcome, ...]:
        return tuple(f for f in self.files if not f.stored)

    def summary(self) -> str:
        """One line for logs and ``last_error``: counts, then the first causes."""
        head = f"{self.stored_count}/{len(self.files)} stored on {self.dest}"
        causes = [self.error] if self.error else []
        failed = [f for f in self.failed if f.status is not None or f.message != NOT_SENT]
        for f in failed[:3]:
            causes.append(f"{Path(f.path).name}: {f.message}")
        if len(failed) > 3:
            causes.append(f"... {len(failed) - 3} more failed")
        unsent = sum(f.message == NOT_SENT for f in self.failed)
        if unsent:
            causes.append(f"{unsent} not sent")
        return head + (": " + "; ".join(causes) if causes else "")


@dataclass
class _Header:
    path: Path
    sop_class: UID
    sop_instance: UID
    syntax: UID
    outcome: FileOutcome | None = field(default=None)


def describe_status(code: int) -> str:
    """``0xA700 (Failure: Refused: Out of Resources)``."""
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(code, ("Unknown", "unknown status"))
    return f"0x{code:04X} ({category}: {text})"


def _read_header(path: Path) -> _Header | FileOutcome:
    try:
        meta = read_file_meta_info(path)
        sop_class = meta.get("MediaStorageSOPClassUID")
        sop_instance = meta.get("MediaStorageSOPInstanceUID")
        syntax = meta.get("TransferSyntaxUID")
        if not (sop_class and sop_instance):
            ds = dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
            )
            sop_class, sop_instance = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    except Exception as exc:  # unreadable, missing, not DICOM
        return FileOutcome(str(path), False, message=f"unreadable: {type(exc).__name__}: {exc}")
    if not (sop_class and sop_instance and syntax):
        return FileOutcome(
            str(path), False, message="no SOP Class/Instance UID or Transfer Syntax in header"
        )
    return _Header(path, UID(sop_class), UID(sop_instance), UID(syntax))


def plan_contexts(headers: Iterable[tuple[str, str]]) -> list[tuple[UID, list[UID]]]:
    """Presentation contexts to propose for (SOP class, transfer syntax) pairs.

    Per SOP class, in order of first appearance: one context per non-native syntax seen,
    then one context offering Explicit and Implicit VR Little Endian.
    """
    by_class: dict[UID, list[UID]] = {}
    for sop_class, syntax in headers:
        seen = by_class.setdefault(UID(sop_class), [])
        if UID(syntax) not in NATIVE_SYNTAXES and UID(syntax) not in seen:
            seen.append(UID(syntax))
    contexts: list[tuple[UID, list[UID]]] = []
    for sop_class, syntaxes in by_class.items():
        contexts.extend((sop_class, [ts]) for ts in syntaxes)
        contexts.append((sop_class, list(NATIVE_SYNTAXES)))
    return contexts


def _association_error(assoc: Association, dest: Destination) -> str:
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        if rsp is not None:
            return (
                f"association rejected by {dest}: {rsp.result_str}, "
                f"source {rsp.source_str}, reason {rsp.reason_str}"
            )
        return f"association rejected by {dest}"
    if assoc.is_aborted and assoc.acceptor.primitive is not None:
        # Negotiated, but the archive accepted none of the presentation contexts.
        return f"association with {dest} aborted: no presentation context accepted"
    return f"could not associate with {dest}: connection refused, reset or timed out"


def _prepare(assoc: Association, h: _Header, dest: Destination) -> tuple[Dataset | None, str]:
    """Read the file and make it fit an accepted context; (None, why) if it cannot."""
    accepted = [
        cx for cx in assoc.accepted_contexts if cx.abstract_syntax == h.sop_class and cx.as_scu
    ]
    if not accepted:
        return None, f"{dest} accepted no presentation context for {h.sop_class.name}"
    ds = dcmread(h.path)
    if any(cx.transfer_syntax[0] == h.syntax for cx in accepted):
        return ds, ""
    native = [cx for cx in accepted if cx.transfer_syntax[0] in NATIVE_SYNTAXES]
    if not native:
        offered = ", ".join(sorted({cx.transfer_syntax[0].name for cx in accepted}))
        return None, f"no usable context for {h.syntax.name} (accepted: {offered})"
    if h.syntax.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:
            return None, (
                f"archive does not take {h.syntax.name} and decompressing failed: "
                f"{type(exc).__name__}: {exc}"
            )
        log.info("decompressed %s (%s) for %s", h.sop_instance, h.syntax.name, dest)
    # Uncompressed or deflated: pynetdicom re-encodes for the accepted native syntax.
    return ds, ""


def _store_one(assoc: Association, h: _Header, dest: Destination, msg_id: int) -> FileOutcome:
    try:
        ds, why = _prepare(assoc, h, dest)
    except Exception as exc:
        return FileOutcome(
            str(h.path), False, h.sop_instance, message=f"unreadable: {type(exc).__name__}: {exc}"
        )
    if ds is None:
        return FileOutcome(str(h.path), False, h.sop_instance, message=why)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    try:
        rsp = assoc.send_c_store(ds, msg_id=msg_id)
    except (ValueError, AttributeError) as exc:
        return FileOutcome(
            str(h.path), False, h.sop_instance, transfer_syntax=syntax, message=str(exc)
        )
    if "Status" not in rsp:
        return FileOutcome(
            str(h.path),
            False,
            h.sop_instance,
            transfer_syntax=syntax,
            message="no C-STORE response (timeout, abort or invalid response)",
        )
    code = int(rsp.Status)
    stored = code in STORED_STATUSES
    message = "" if code == 0 else describe_status(code)
    comment = rsp.get("ErrorComment")
    if comment and not stored:
        message += f": {comment}"
    return FileOutcome(str(h.path), stored, h.sop_instance, code, syntax, message)


def send_files(
    paths: Sequence[str | Path],
    dest: Destination,
    *,
    calling_aet: str,
    timeout: float,
    progress: ProgressFn | None = None,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> SendResult:
    """C-STORE every file in ``paths`` to ``dest`` over one association.

    Parameters
    ----------
    paths : sequence of str or Path
        DICOM Part 10 files. Unreadable ones fail individually; the rest are still sent.
    dest : Destination
        The SCP to call.
    calling_aet : str
        Our AE title.
    timeout : float
        Seconds for the TCP connect, association negotiation, each DIMSE response and
        network inactivity.
    progress : callable, optional
        Called as ``progress(done, total)`` after each file (e.g. to renew a lease).
    tls : ssl.SSLContext, optional
        Associate over TLS with this client context.
    server_hostname : str, optional
        The name the peer's certificate must carry; defaults to ``dest.host``.

    Returns
    -------
    SendResult
        Never raises for network or peer failures; they are reported in the result.
    """
    started = time.monotonic()
    outcomes: list[FileOutcome | None] = []
    headers: list[_Header] = []
    for p in paths:
        h = _read_header(Path(p))
        if isinstance(h, FileOutcome):
            outcomes.append(h)
        else:
            headers.append(h)
            outcomes.append(None)
    if not headers:
        return SendResult(dest, tuple(o for o in outcomes if o is not None), None, 0, 0.0)

    contexts = plan_contexts((h.sop_class, h.syntax) for h in headers)
    if len(contexts) > MAX_CONTEXTS:
        error = f"{len(contexts)} presentation contexts needed, at most {MAX_CONTEXTS} allowed"
        return _finish(dest, outcomes, headers, error, 0, started)

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    tls_args = (tls, server_hostname or dest.host) if tls is not None else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        error = _association_error(assoc, dest)
        if tls is not None and not assoc.is_rejected and not assoc.is_aborted:
            error += " (or the TLS handshake failed; see the log)"
        return _finish(dest, outcomes, headers, error, 1, started)

    error: str | None = None
    try:
        for i, h in enumerate(headers):
            h.outcome = _store_one(assoc, h, dest, msg_id=i % 65535 + 1)
            if progress is not None:
                progress(i + 1, len(headers))
            if not assoc.is_established:
                error = f"association with {dest} aborted after {i + 1} of {len(headers)} files"
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return _finish(dest, outcomes, headers, error, 1, started)


def _finish(
    dest: Destination,
    outcomes: list[FileOutcome | None],
    headers: list[_Header],
    error: str | None,
    associations: int,
    started: float,
) -> SendResult:
    pending = iter(headers)
    files = []
    for o in outcomes:
        if o is None:
            h = next(pending)
            o = h.outcome or FileOutcome(str(h.path), False, h.sop_instance, message=NOT_SENT)
        files.append(o)
    result = SendResult(dest, tuple(files), error, associations, time.monotonic() - started)
    log.log(logging.INFO if result.ok else logging.WARNING, "send: %s", result.summary())
    return result
