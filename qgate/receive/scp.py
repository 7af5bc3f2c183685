"""Wiring of the C-STORE SCP: the application entity, its contexts and its handlers.

What qgate accepts at association negotiation:

* Verification (C-ECHO), with pynetdicom's default transfer syntaxes.
* C-STORE of **CT Image Storage** and **Enhanced CT Image Storage only**. Presentation
  contexts for any other storage SOP class are rejected at negotiation (abstract syntax
  not supported), so an MR or SR never reaches the spool; the sender sees the refusal
  before it sends a byte of the dataset. qgate is a CT gate: storing instances it would
  never score would make them silently disappear behind it instead.
* Transfer syntaxes :data:`TRANSFER_SYNTAXES`: implicit and explicit VR little endian,
  deflated explicit VR little endian, JPEG baseline, extended and lossless (processes 14
  and 14 SV1), JPEG-LS lossless and near-lossless, JPEG 2000 lossless and lossy, and RLE.
  Any other syntax is rejected at negotiation. The bytes are stored as received; pixels
  are decoded later, by pydicom with the pylibjpeg plugins.
* A non-empty ``dicom.allowed_calling_aets`` rejects associations from any other calling
  AE title (A-ASSOCIATE-RJ, "calling AE title not recognised"); so does a non-empty
  ``dicom.allowed_peers`` for an AE title calling from an address not listed with it.
* ``dicom.require_called_aet`` rejects a called AE title other than ``dicom.ae_title``
  ("called AE title not recognised"); ``dicom.maximum_associations`` caps associations
  served at once ("local limit exceeded"); below ``storage.min_free_mb`` of free space
  every new association is refused, as transient (:mod:`qgate.receive.policy`).
* ``dicom.tls.enabled``: the port speaks DICOM TLS only (TLS 1.2+, :mod:`qgate.core.tls`); a
  plain-TCP client, or one whose certificate is missing (when required) or untrusted,
  fails the handshake and is disconnected.

``maximum_pdu_size = 0`` lets the peer send PDUs of any size, and the handler writes
the encoded dataset as received, never decoding it (the fast path; see
:mod:`qgate.receive.handlers`).
Accepted associations run :mod:`qgate.receive.reactor`'s acceptor loop, which wakes on
each complete request instead of polling every millisecond, and answer C-STORE from a
template of pynetdicom's own response encoding (:mod:`qgate.receive.storersp`).
"""

from __future__ import annotations

import logging
import socket

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.spool import ensure_dir
from qgate.core.tls import server_context
from qgate.receive.handlers import (
    CT_STORAGE_SOP_CLASSES,
    LOGGER,
    ReceiveContext,
    handle_echo,
    handle_rejected,
    handle_release,
    handle_store,
)
from qgate.receive.listener import AssociationSlots, LoadBoard
from qgate.receive.policy import handle_requested
from qgate.receive.reactor import INTERNALS, start_server

TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,  # 1.2.840.10008.1.2.4.50
    JPEGExtended12Bit,  # .4.51
    JPEGLossless,  # .4.57
    JPEGLosslessSV1,  # .4.70
    JPEGLSLossless,  # .4.80
    JPEGLSNearLossless,  # .4.81
    JPEG2000Lossless,  # .4.90
    JPEG2000,  # .4.91
    RLELossless,  # .5
)


def build_ae(settings: Settings) -> AE:
    """The SCP's application entity, configured from ``settings.dicom`` (not started)."""
    cfg = settings.dicom
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_pdu_size = 0
    ae.network_timeout = cfg.network_timeout
    ae.require_calling_aet = list(cfg.allowed_calling_aets)
    ae.require_called_aet = cfg.require_called_aet
    ae.maximum_associations = cfg.maximum_associations
    ae.add_supported_context(Verification)
    for sop_class in CT_STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


def event_handlers(ctx: ReceiveContext) -> list[evt.EventHandlerType]:
    """Handlers with ``ctx`` bound as their extra argument."""
    return [
        (evt.EVT_REQUESTED, handle_requested, [ctx]),
        (evt.EVT_C_ECHO, handle_echo, [ctx]),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_RELEASED, handle_release, [ctx]),
        (evt.EVT_ABORTED, handle_release, [ctx]),
        (evt.EVT_CONN_CLOSE, handle_release, [ctx]),
        (evt.EVT_REJECTED, handle_rejected, [ctx]),
    ]


def start_scp(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    logger: logging.Logger | None = None,
    listen_socket: socket.socket | None = None,
    board: LoadBoard | None = None,
    slots: AssociationSlots | None = None,
) -> ThreadedAssociationServer:
    """Start the SCP on ``settings.dicom.host:port`` in background threads.

    Parameters
    ----------
    settings : qgate.core.config.Settings
        Uses ``dicom`` (AE title, address, whitelists, limits, timeout, TLS, internals)
        and ``storage`` (spool root, fsync, free-space watermark).
    sessions : sqlalchemy.orm.sessionmaker
        Session factory of a migrated SQL store.
    logger : logging.Logger, optional
        Defaults to the ``qgate.receive`` logger.
    listen_socket : socket.socket, optional
        A listening socket shared by several receiver processes
        (:mod:`qgate.receive.listener`) to accept from instead of binding the address.
    board : qgate.receive.listener.LoadBoard, optional
        Where the processes sharing ``listen_socket`` publish how busy they are.
    slots : qgate.receive.listener.AssociationSlots, optional
        The node-wide ``dicom.maximum_associations`` when several processes receive.

    Returns
    -------
    pynetdicom.transport.ThreadedAssociationServer
        Call its ``shutdown()`` to stop.
    """
    ensure_dir(settings.spool_dir, fsync=settings.storage.fsync)
    ctx = ReceiveContext(settings=settings, sessions=sessions, logger=logger or LOGGER, slots=slots)
    ae = build_ae(settings)
    tls = settings.dicom.tls
    return start_server(
        ae,
        (settings.dicom.host, settings.dicom.port),
        event_handlers(ctx),
        ssl_context=server_context(tls) if tls.enabled else None,
        listen_socket=listen_socket,
        board=board,
        internals=[i for i in settings.dicom.internals if i in INTERNALS],
    )
