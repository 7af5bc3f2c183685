"""Serve the review app from ``qgate serve``: uvicorn on a thread of its own.

The socket is bound here, before the thread starts, so a port in use is a plain
``OSError`` for the caller rather than a ``sys.exit`` inside uvicorn's thread.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.web.app import create_app

log = logging.getLogger(__name__)


class WebServer:
    """The review app on ``web.host:web.port``; :meth:`stop` ends it cleanly."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        web = settings.web
        family = socket.AF_INET6 if ":" in web.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((web.host, web.port))
        except OSError:
            self._sock.close()
            raise
        self._sock.listen(128)
        self.host, self.port = web.host, int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            create_app(settings, sessions),
            log_level="warning",
            access_log=False,
            lifespan="off",
            proxy_headers=True,
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="web", daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> WebServer:
        self._thread.start()
        log.info("review app on %s", self.url)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sock.close()


def start_web(settings: Settings, sessions: sessionmaker[Session]) -> WebServer:
    """Bind and start the review app; raises ``OSError`` when the port cannot be bound."""
    return WebServer(settings, sessions).start()
