"""``qgate receive``: the C-STORE SCP and, beside it, series assembly.

At start the spool is reconciled with the store (:mod:`qgate.receive.recover`), then the
SCP listens on ``dicom.host:port`` and the assembler queues complete series. Stopping
closes the listening socket and lets open associations end.
"""

from __future__ import annotations

import logging

from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine

from qgate.assemble import Assembler
from qgate.config import Settings
from qgate.receive.recover import recover_spool
from qgate.receive.scp import start_scp
from qgate.stage import StageName, open_store

log = logging.getLogger(__name__)


class ReceiveStage:
    name: StageName = "receive"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._scp: ThreadedAssociationServer | None = None
        self._assembler: Assembler | None = None

    def start(self) -> None:
        s = self.settings
        s.spool_dir.mkdir(parents=True, exist_ok=True)
        self._engine, sessions = open_store(s)
        recover_spool(s, sessions)
        self._assembler = Assembler(s, sessions)
        self._assembler.start()
        self._scp = start_scp(s, sessions)
        log.info("receiving as %s on %s:%d", s.dicom.ae_title, s.dicom.host, s.dicom.port)

    def stop(self) -> None:
        if self._scp is not None:
            self._scp.shutdown()
        if self._assembler is not None:
            self._assembler.stop()
            self._assembler.join(timeout=60)
        if self._engine is not None:
            self._engine.dispose()
