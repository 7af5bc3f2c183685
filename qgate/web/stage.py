"""``qgate web``: the review app (and its API) on ``web.host:web.port``."""

from __future__ import annotations

from sqlalchemy import Engine

from qgate.core.config import Settings
from qgate.core.stage import StageName, open_store
from qgate.web.server import WebServer


class WebStage:
    name: StageName = "web"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._server: WebServer | None = None

    def start(self) -> None:
        """Bind and serve; raises ``OSError`` when the port cannot be bound."""
        self._engine, sessions = open_store(self.settings)
        try:
            self._server = WebServer(self.settings, sessions).start()
        except OSError:
            self._engine.dispose()
            raise

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self._engine is not None:
            self._engine.dispose()
