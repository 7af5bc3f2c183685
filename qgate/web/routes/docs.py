"""OpenAPI schema and Swagger UI, behind the login like everything else."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from qgate.web.deps import CurrentUser

router = APIRouter(include_in_schema=False)


@router.get("/openapi.json")
def openapi(request: Request, user: CurrentUser) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
def docs(user: CurrentUser) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="qgate API")
