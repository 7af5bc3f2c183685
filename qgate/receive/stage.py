"""``qgate receive``: the C-STORE SCP and, beside it, series assembly.

At start the spool is reconciled with the store (:mod:`qgate.receive.recover`), then the
stage listens on ``dicom.host:port`` and the assembler queues complete series. With
``dicom.receivers: N`` above 1 the stage starts ``N - 1`` listener processes that accept
from the same listening socket and restarts one that exits (:mod:`qgate.receive.listener`);
the spool is reconciled before any of them runs. Stopping accepts no new association in
any receiver process, lets the open ones go on for up to ``dicom.stop_grace_seconds`` (in
every process at once), then aborts the rest once the C-STORE in hand is stored
(:mod:`qgate.receive.drain`).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine

from qgate.assemble.completion import Assembler
from qgate.core.config import Settings
from qgate.core.stage import StageName, open_store
from qgate.receive.drain import stop_server
from qgate.receive.listener import (
    AssociationSlots,
    ListenerSupervisor,
    LoadBoard,
    SlotFolder,
    die_with_parent,
    inherited_socket,
    listen_socket,
)
from qgate.receive.recover import recover_spool
from qgate.receive.scp import start_scp

log = logging.getLogger(__name__)


class ReceiveStage:
    """The receive stage of a node: recovery, assembly, and ``dicom.receivers`` receiver
    processes on one port (this one and ``dicom.receivers - 1`` listener processes).

    Parameters
    ----------
    settings : qgate.core.config.Settings
        The stage's configuration.
    receive_argv : sequence of str
        The command that runs ``qgate receive`` with this configuration (the listener
        processes append their options); needed when ``dicom.receivers`` > 1.
    """

    name: StageName = "receive"

    def __init__(self, settings: Settings, *, receive_argv: Sequence[str] = ()) -> None:
        self.settings = settings
        self.receive_argv = list(receive_argv)
        self._engine: Engine | None = None
        self._scp: ThreadedAssociationServer | None = None
        self._assembler: Assembler | None = None
        self._socket: socket.socket | None = None
        self._slots: SlotFolder | None = None
        self._listeners: threading.Thread | None = None
        self._stop_listeners = threading.Event()

    def start(self) -> None:
        s = self.settings
        s.spool_dir.mkdir(parents=True, exist_ok=True)
        self._engine, sessions = open_store(s)
        recover_spool(s, sessions)
        self._socket = listen_socket(s.dicom.host, s.dicom.port)
        slots = board = None
        extra = s.dicom.receivers - 1
        if extra:
            if not self.receive_argv:
                raise ValueError("dicom.receivers > 1 needs the command of a listener")
            # A folder a killed stage left behind is removed first.
            self._slots = SlotFolder.create()
            slots = AssociationSlots(self._slots.path, s.dicom.maximum_associations)
            board = LoadBoard(self._slots.path, 0, s.dicom.receivers)
            supervisor = ListenerSupervisor(
                s,
                sock=self._socket,
                slots=self._slots.path,
                count=extra,
                receive_argv=self.receive_argv,
            )
            self._listeners = threading.Thread(
                target=supervisor.run, args=(self._stop_listeners,), name="receivers"
            )
            self._listeners.start()
        self._assembler = Assembler(s, sessions)
        self._assembler.start()
        self._scp = start_scp(s, sessions, listen_socket=self._socket, board=board, slots=slots)
        log.info(
            "receiving as %s on %s:%d (%d receiver process%s)",
            s.dicom.ae_title,
            s.dicom.host,
            s.dicom.port,
            s.dicom.receivers,
            "es" if s.dicom.receivers > 1 else "",
        )

    def stop(self) -> None:
        # The listener processes get SIGTERM now and drain beside this one.
        self._stop_listeners.set()
        if self._scp is not None:
            stop_server(self._scp, grace_seconds=self.settings.dicom.stop_grace_seconds)
        if self._listeners is not None:
            self._listeners.join()
        if self._socket is not None:
            self._socket.close()
        if self._slots is not None:
            self._slots.remove()
        if self._assembler is not None:
            self._assembler.stop()
            self._assembler.join(timeout=60)
        if self._engine is not None:
            self._engine.dispose()


class ReceiveListener:
    """One listener process of the receive stage (``qgate receive --listen-fd``): the SCP
    on the listening socket the stage process passed down, nothing else.

    Parameters
    ----------
    settings : qgate.core.config.Settings
        The stage's configuration.
    fd : int
        The inherited listening socket.
    slots : pathlib.Path
        The stage's association slot folder (:class:`AssociationSlots`).
    parent : int
        The stage process; this one exits when it dies.
    index : int
        This listener's number (1 to ``dicom.receivers - 1``).
    """

    name: StageName = "receive"

    def __init__(
        self, settings: Settings, *, fd: int, slots: Path, parent: int, index: int
    ) -> None:
        self.settings = settings
        self.index = index
        #: How the logs name this process (:func:`qgate.core.stage.describe`).
        self.label = f"receiver process {index} of stage receive"
        self.fd = fd
        self.slots = slots
        self.parent = parent
        self._engine: Engine | None = None
        self._scp: ThreadedAssociationServer | None = None

    def start(self) -> None:
        die_with_parent(self.parent)
        s = self.settings
        self._engine, sessions = open_store(s)
        self._scp = start_scp(
            s,
            sessions,
            listen_socket=inherited_socket(self.fd),
            board=LoadBoard(self.slots, self.index, s.dicom.receivers),
            slots=AssociationSlots(self.slots, s.dicom.maximum_associations),
        )

    def stop(self) -> None:
        if self._scp is not None:
            stop_server(self._scp, grace_seconds=self.settings.dicom.stop_grace_seconds)
        if self._engine is not None:
            self._engine.dispose()
