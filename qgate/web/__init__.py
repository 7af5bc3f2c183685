"""The review web app (issue 5): worklist, series pages with quality maps, verdicts,
JSON API under ``/api`` with OpenAPI docs at ``/docs``, ``/healthz`` and ``/metrics``.

FastAPI with server-rendered Jinja templates and a little plain JavaScript. Layout, after
full-stack-fastapi-template: :mod:`qgate.web.app` (factory), :mod:`qgate.web.deps` (typed
dependencies), :mod:`qgate.web.routes` (one router per resource), :mod:`qgate.web.crud`
(data access), :mod:`qgate.web.schemas` (API models), :mod:`qgate.web.security`.
"""

from __future__ import annotations

from qgate.web.app import create_app
from qgate.web.server import WebServer, start_web

__all__ = ["WebServer", "create_app", "start_web"]
