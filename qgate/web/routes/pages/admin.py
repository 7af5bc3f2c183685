"""Admin pages: users (list, add) and the audit log."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, status
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from qgate.users import ROLES, UserError, create_user
from qgate.web import crud
from qgate.web.deps import AdminUser, SessionDep
from qgate.web.templating import flash, render

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
        actions=["login", "login_failed", "logout", "verdict", "release", "user_add"],
    )
