"""Session secret, CSRF tokens and response security headers.

Sessions are Starlette's signed cookies (HttpOnly, SameSite=Lax, Secure when
``web.secure_cookies``). Every unsafe request (POST, PUT, PATCH, DELETE) must carry the
session's CSRF token, as the ``csrf_token`` form field or the ``X-CSRF-Token`` header;
:func:`csrf_protect` is an app-wide dependency, so a new form cannot forget it.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

from fastapi import HTTPException, Request, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qgate.core.config import Settings

log = logging.getLogger(__name__)

SECRET_FILE = "web-secret.key"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def load_secret_key(settings: Settings) -> str:
    """``web.secret_key``, else the key kept in ``storage.root/web-secret.key``.

    The file is created on first use with a random 384-bit key, mode 0600, and never
    overwritten (two processes starting at once read the winner's key).
    """
    if settings.web.secret_key is not None:
        key = settings.web.secret_key.get_secret_value()
        if len(key) < 32:
            raise ValueError("web.secret_key must have at least 32 characters")
        return key
    path = Path(settings.storage.root) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if len(key) < 32:
            raise ValueError(f"{path} holds no usable key; delete it to generate one") from None
        return key
    key = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.info("generated a new web session key in %s", path)
    return key


def local_path(target: str | None, default: str = "/") -> str:
    """``target`` if it is a path on this site, else ``default``: no open redirects, no
    ``javascript:`` links from a query parameter."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


def csrf_token(request: Request) -> str:
    """This session's CSRF token, created on first use."""
    token = request.session.get("csrf")
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def new_session(request: Request, **values: object) -> None:
    """Start a fresh session (after login): old contents and the CSRF token are dropped."""
    request.session.clear()
    request.session.update(values)
    csrf_token(request)


async def csrf_protect(request: Request) -> None:
    """App-wide dependency: reject an unsafe request without this session's CSRF token."""
    if request.method in _SAFE_METHODS:
        return
    expected = request.session.get("csrf")
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            value = (await request.form()).get(CSRF_FIELD)
            sent = value if isinstance(value, str) else None
    if not expected or not sent or not hmac.compare_digest(str(expected), sent):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "CSRF token missing or wrong")


# One policy for every page, /docs included (Swagger UI is served from /static/swagger/).
_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)


class SecurityHeaders:
    """ASGI middleware: CSP, no sniffing, no framing, same-origin referrers, no caching of
    pages (patient data) unless the route set its own Cache-Control."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [
                    (b"content-security-policy", _CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                ]
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"max-age=3600" if static else b"no-store"))
                headers.extend(extra)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
