"""Log in and out. A new session (and CSRF token) starts at every login."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, status
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from qgate.users import authenticate
from qgate.web import crud
from qgate.web.deps import (
    LoginRequired,
    SessionDep,
    client_addr,
    get_current_user,
    password_stamp,
)
from qgate.web.security import local_path, new_session
from qgate.web.templating import render

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
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form()] = "/",
) -> Response:
    user = authenticate(session, username=username, password=password)
    if user is None:
        crud.audit(
            session,
            user=None,
            username=username[:64],
            action="login_failed",
            detail={},
            remote_addr=client_addr(request),
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
