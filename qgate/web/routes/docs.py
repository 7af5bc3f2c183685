"""OpenAPI schema and Swagger UI, behind the login like everything else.

Nothing is fetched at run time (hospital networks are offline): Swagger UI's script and
style are the ``swagger-ui-dist`` files that the ``fastapi-offline`` package ships, served
from ``/static/swagger/`` (:data:`SWAGGER_ASSETS`), and the page starts it from
``/static/docs.js`` rather than an inline script, so ``/docs`` keeps the app's strict
Content-Security-Policy. ReDoc is not served.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from qgate.web.deps import CurrentUser
from qgate.web.templating import render

router = APIRouter(include_in_schema=False)

#: (package, folder) of the Swagger UI files, for ``StaticFiles(packages=...)``.
SWAGGER_ASSETS = ("fastapi_offline", "static")
SWAGGER_URL = "/static/swagger"


@router.get("/openapi.json")
def openapi(request: Request, user: CurrentUser) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
def docs(request: Request, user: CurrentUser) -> Response:
    return render(
        request,
        "docs.html",
        user=user,
        nav="docs",
        openapi_url="/openapi.json",
        swagger_js=f"{SWAGGER_URL}/swagger-ui-bundle.js",
        swagger_css=f"{SWAGGER_URL}/swagger-ui.css",
    )
