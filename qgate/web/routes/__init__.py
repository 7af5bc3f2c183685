"""Every router of the app, gathered in one place."""

from __future__ import annotations

from fastapi import APIRouter

from qgate.web.routes import docs, monitoring
from qgate.web.routes.api import series as api_series
from qgate.web.routes.api import users as api_users
from qgate.web.routes.pages import admin, auth, training, worklist
from qgate.web.routes.pages import series as series_pages

api_router = APIRouter()
api_router.include_router(api_series.router)
api_router.include_router(api_users.router)

pages_router = APIRouter()
for module in (auth, worklist, series_pages, admin, training, docs):
    pages_router.include_router(module.router)

monitoring_router = monitoring.router

__all__ = ["api_router", "monitoring_router", "pages_router"]
