"""The app factory: settings and a session factory in, a FastAPI app out (no globals)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request, status
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import Response

from qgate import __version__
from qgate.core.config import Settings
from qgate.core.db import make_engine, make_session_factory
from qgate.web.deps import Forbidden, LoginRequired, get_current_user
from qgate.web.images import MapImages
from qgate.web.metrics import make_registry
from qgate.web.routes import api_router, monitoring_router, pages_router
from qgate.web.routes.docs import SWAGGER_ASSETS, SWAGGER_URL
from qgate.web.security import SecurityHeaders, csrf_protect, load_secret_key
from qgate.web.templating import make_templates, render

STATIC_DIR = Path(__file__).parent / "static"
SESSION_COOKIE = "qgate_session"


def _wants_json(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/api/") or path in ("/openapi.json", "/healthz", "/metrics")


def _page_user(request: Request) -> object | None:
    """The logged-in user for an error page's navigation, if any."""
    try:
        with request.app.state.sessions() as session:
            user = get_current_user(request, session)
            session.expunge(user)
            return user
    except LoginRequired:
        return None


async def _login_required(request: Request, exc: Exception) -> Response:
    if _wants_json(request):
        return JSONResponse({"detail": "not authenticated"}, status.HTTP_401_UNAUTHORIZED)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status.HTTP_303_SEE_OTHER)


async def _forbidden(request: Request, exc: Exception) -> Response:
    message = exc.message if isinstance(exc, Forbidden) else "forbidden"
    if _wants_json(request):
        return JSONResponse({"detail": message}, status.HTTP_403_FORBIDDEN)
    return render(
        request,
        "error.html",
        user=_page_user(request),  # type: ignore[arg-type]
        status_code=status.HTTP_403_FORBIDDEN,
        title="Not allowed",
        message=message,
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if _wants_json(request) or exc.status_code < 400:
        return await http_exception_handler(request, exc)
    titles = {403: "Not allowed", 404: "Not found", 405: "Not allowed", 409: "Conflict"}
    return render(
        request,
        "error.html",
        user=_page_user(request),  # type: ignore[arg-type]
        status_code=exc.status_code,
        title=titles.get(exc.status_code, "Error"),
        message=str(exc.detail),
    )


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if _wants_json(request):
        return await request_validation_exception_handler(request, exc)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in exc.errors()
    )
    return render(
        request,
        "error.html",
        user=_page_user(request),  # type: ignore[arg-type]
        status_code=status.HTTP_400_BAD_REQUEST,
        title="Bad request",
        message=problems,
    )


def create_app(settings: Settings, sessions: sessionmaker[Session] | None = None) -> FastAPI:
    """The review app on ``settings``' database (or on ``sessions``, shared with the
    pipeline in ``qgate serve``)."""
    if sessions is None:
        sessions = make_session_factory(make_engine(settings.database.url), node=settings.node_name)
    app = FastAPI(
        title="qgate review",
        version=__version__,
        description=(
            "Radiologist review of qgate's quality gate. Log in at /login; the session "
            "cookie authenticates API calls, and every POST needs the X-CSRF-Token header "
            "(GET /api/me returns it)."
        ),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(csrf_protect)],
    )
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.templates = make_templates()
    app.state.images = MapImages()
    app.state.metrics = make_registry(sessions, settings)

    app.include_router(monitoring_router)
    app.include_router(api_router)
    app.include_router(pages_router)
    # Swagger UI's files (a package's data) before the app's own: the longer prefix first.
    app.mount(SWAGGER_URL, StaticFiles(packages=[SWAGGER_ASSETS]), name="swagger")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(Forbidden, _forbidden)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)

    app.add_middleware(
        SessionMiddleware,
        secret_key=load_secret_key(settings),
        session_cookie=SESSION_COOKIE,
        max_age=round(settings.web.session_hours * 3600),
        same_site="lax",
        https_only=settings.web.secure_cookies,
    )
    app.add_middleware(SecurityHeaders)
    return app
