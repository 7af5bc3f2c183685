"""``/healthz`` and ``/metrics``: the only paths served without a login."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response

from qgate.core.diskspace import disk_space
from qgate.web.deps import SessionDep, SettingsDep
from qgate.web.schemas import Health

router = APIRouter(tags=["monitoring"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(session: SessionDep, settings: SettingsDep) -> Response:
    """200 when the database answers and free space is above ``storage.min_free_mb``;
    else 503, with the reason in ``database`` or ``disk``."""
    database = "ok"
    try:
        session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        database = type(exc).__name__
    disk = disk_space(settings).reason or "ok"
    healthy = database == "ok" and disk == "ok"
    body = Health(status="ok" if healthy else "error", database=database, disk=disk)
    return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format: received instances, series by decision, queue depth,
    scoring latency, outbox failures (see :mod:`qgate.web.metrics`)."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
