"""``/healthz`` and ``/metrics``: the only paths served without a login."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response

from qgate.web.deps import SessionDep
from qgate.web.schemas import Health

router = APIRouter(tags=["monitoring"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(session: SessionDep) -> Response:
    """200 when the database answers, else 503."""
    try:
        session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        body = Health(status="error", database=type(exc).__name__)
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(Health(status="ok", database="ok").model_dump())


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format: received instances, series by decision, queue depth,
    scoring latency, outbox failures (see :mod:`qgate.web.metrics`)."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
