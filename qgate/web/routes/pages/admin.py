"""Admin pages: users (list, add, disable/enable, reset password, unlock) and the audit
log. Every change is audited in its transaction (:mod:`qgate.web.users`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, status
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from qgate.web import crud
from qgate.web.deps import AdminUser, SessionDep
from qgate.web.templating import flash, render
from qgate.web.users import (
    ROLES,
    UserError,
    create_user,
    reset_password,
    set_active,
    unlock_user,
)

router = APIRouter(prefix="/admin", include_in_schema=False)


@router.get("/users")
def users_page(request: Request, session: SessionDep, user: AdminUser) -> Response:
    return render(
        request,
        "users.html",
        user=user,
        nav="users",
        users=crud.list_users(session),
        roles=ROLES,
    )


@router.post("/users")
def add_user(
    request: Request,
    session: SessionDep,
    user: AdminUser,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    role: Annotated[str, Form()],
) -> Response:
    try:
        create_user(session, username=username, password=password, role=role, by=user.username)
    except UserError as exc:
        session.rollback()
        flash(request, "error", f"User not added: {exc}")
    else:
        session.commit()
        flash(request, "ok", f"User {username} added as {role}.")
    return RedirectResponse("/admin/users", status.HTTP_303_SEE_OTHER)


def _user_change(
    request: Request, session: SessionDep, change: Callable[[], object], done: str
) -> Response:
    try:
        change()
    except UserError as exc:
        session.rollback()
        flash(request, "error", f"Not done: {exc}")
    else:
        session.commit()
        flash(request, "ok", done)
    return RedirectResponse("/admin/users", status.HTTP_303_SEE_OTHER)


@router.post("/users/{username}/disable")
def disable_user(request: Request, session: SessionDep, user: AdminUser, username: str) -> Response:
    return _user_change(
        request,
        session,
        lambda: set_active(session, username=username, active=False, by=user.username),
        f"User {username} disabled; their sessions have ended.",
    )


@router.post("/users/{username}/enable")
def enable_user(request: Request, session: SessionDep, user: AdminUser, username: str) -> Response:
    return _user_change(
        request,
        session,
        lambda: set_active(session, username=username, active=True, by=user.username),
        f"User {username} enabled.",
    )


@router.post("/users/{username}/password")
def reset_user_password(
    request: Request,
    session: SessionDep,
    user: AdminUser,
    username: str,
    password: Annotated[str, Form(max_length=1024)],
) -> Response:
    return _user_change(
        request,
        session,
        lambda: reset_password(session, username=username, password=password, by=user.username),
        f"Password of {username} reset; their sessions have ended.",
    )


@router.post("/users/{username}/unlock")
def unlock(request: Request, session: SessionDep, user: AdminUser, username: str) -> Response:
    return _user_change(
        request,
        session,
        lambda: unlock_user(session, username=username, by=user.username),
        f"Failed logins of {username} forgotten.",
    )


@router.get("/audit")
def audit_page(
    request: Request,
    session: SessionDep,
    user: AdminUser,
    page: Annotated[int, Query(ge=1)] = 1,
    action: str | None = None,
) -> Response:
    per_page = 50
    rows, total = crud.list_audit(session, page=page, per_page=per_page, action=action or None)
    return render(
        request,
        "audit.html",
        user=user,
        nav="audit",
        entries=rows,
        page=page,
        pages=max(1, math.ceil(total / per_page)),
        total=total,
        action=action or "",
        actions=[
            "login",
            "login_failed",
            "login_throttled",
            "logout",
            "verdict",
            "release",
            "user_add",
            "user_disable",
            "user_enable",
            "password_reset",
            "user_unlock",
        ],
    )
