"""``qgate dispatch``: sends due outbox items to the archive, one association each."""

from __future__ import annotations

import os

from sqlalchemy import Engine

from qgate.core.config import Settings
from qgate.core.stage import StageName, open_store
from qgate.dispatch.dispatcher import Dispatcher


class DispatchStage:
    name: StageName = "dispatch"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._dispatcher: Dispatcher | None = None

    def start(self) -> None:
        s = self.settings
        if s.archive.tls.enabled:
            # Fail at start, not at the first send, on a missing or mismatched file.
            from qgate.core.tls import client_context

            client_context(s.archive.tls)
        self._engine, sessions = open_store(s)
        # Dispatchers never take over each other's items by name (a lapsed lease does
        # that), so the process ID keeps two dispatchers on one node apart.
        owner = f"{s.node_name}/dispatch-{os.getpid()}"
        self._dispatcher = Dispatcher(s, sessions, owner=owner)
        self._dispatcher.start()

    def stop(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.stop()
            self._dispatcher.join(timeout=120)
        if self._engine is not None:
            self._engine.dispose()
