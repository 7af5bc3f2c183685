"""Log in and out. A new session (and CSRF token) starts at every login.

Failed logins are throttled (:func:`qgate.web.users.login_throttle`, ``web.login_*``): a
refused attempt answers 429 without checking the password and is audited as
``login_throttled``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, status
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from qgate.web import crud
from qgate.web.deps import (
    LoginRequired,
    SessionDep,
    SettingsDep,
    client_addr,
    get_current_user,
    password_stamp,
)
from qgate.web.security import local_path, new_session
from qgate.web.templating import render
from qgate.web.users import authenticate, login_throttle

router = APIRouter(include_in_schema=False)


@router.get("/login")
def login_page(request: Request, session: SessionDep, next: str | None = None) -> Response:
    try:
        get_current_user(request, session)
        return RedirectResponse(local_path(next), status.HTTP_303_SEE_OTHER)
    except LoginRequired:
        pass
    return render(request, "login.html", user=None, next=local_path(next), error=None)


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form()] = "/",
) -> Response:
    username = username.strip()
    addr = client_addr(request)
    throttle = login_throttle(session, username=username, remote_addr=addr, web=settings.web)
    if throttle is not None:
        crud.audit(
            session,
            user=None,
            username=username,
            action="login_throttled",
            detail={
                "scope": throttle.scope,
                "retry_after_s": int(throttle.retry_after.total_seconds()),
            },
            remote_addr=addr,
        )
        session.commit()
        response = render(
            request,
            "login.html",
            user=None,
            next=local_path(next),
            error=throttle.message,
            username=username,
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
        )
        response.headers["Retry-After"] = str(int(throttle.retry_after.total_seconds()) + 1)
        return response
    user = authenticate(session, username=username, password=password)
    if user is None:
        crud.audit(
            session,
            user=None,
            username=username,
            action="login_failed",
            detail={},
            remote_addr=addr,
        )
        session.commit()
        return render(
            request,
            "login.html",
            user=None,
            next=local_path(next),
            error="Unknown user name or wrong password.",
            username=username,
            status_code=status.HTTP_401_UNAUTHORIZED,
        )
    crud.audit(session, user=user, action="login", detail={}, remote_addr=client_addr(request))
    session.commit()
    new_session(request, uid=user.id, pw=password_stamp(user))
    return RedirectResponse(local_path(next), status.HTTP_303_SEE_OTHER)


@router.post("/logout")
def logout(request: Request, session: SessionDep) -> Response:
    try:
        user = get_current_user(request, session)
    except LoginRequired:
        user = None
    if user is not None:
        crud.audit(session, user=user, action="logout", detail={}, remote_addr=client_addr(request))
        session.commit()
    request.session.clear()
    return RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
