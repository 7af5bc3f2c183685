"""``/api/me``, ``/api/users`` (admin) and ``/api/audit`` (admin)."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status

from qgate.users import UserError, create_user
from qgate.web import crud
from qgate.web.deps import AdminUser, CurrentUser, SessionDep
from qgate.web.schemas import AuditEntryPublic, AuditPage, Me, UserCreate, UserPublic
from qgate.web.security import csrf_token

router = APIRouter(prefix="/api", tags=["users"])


@router.get("/me", response_model=Me)
def me(request: Request, user: CurrentUser) -> Me:
    """The logged-in user, and the CSRF token to send as ``X-CSRF-Token`` with POSTs."""
    return Me(username=user.username, role=user.role, csrf_token=csrf_token(request))


@router.get("/users", response_model=list[UserPublic])
def list_users(session: SessionDep, user: AdminUser) -> list[UserPublic]:
    return [UserPublic.model_validate(u) for u in crud.list_users(session)]


@router.post("/users", response_model=UserPublic, status_code=status.HTTP_201_CREATED)
def add_user(body: UserCreate, session: SessionDep, user: AdminUser) -> UserPublic:
    """Create a user (audited). Admins only."""
    try:
        created = create_user(
            session,
            username=body.username,
            password=body.password,
            role=body.role,
            by=user.username,
        )
    except UserError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    session.commit()
    return UserPublic.model_validate(created)


@router.get("/audit", response_model=AuditPage)
def audit_log(
    session: SessionDep,
    user: AdminUser,
    page: Annotated[int, Query(ge=1)] = 1,
    per_page: Annotated[int, Query(ge=1, le=500)] = 100,
    action: str | None = None,
    username: str | None = None,
) -> AuditPage:
    """Who did what, when: newest first. Admins only."""
    rows, total = crud.list_audit(
        session, page=page, per_page=per_page, action=action, username=username
    )
    return AuditPage(
        items=[AuditEntryPublic.model_validate(r) for r in rows],
        total=total,
        page=page,
        per_page=per_page,
        pages=max(1, math.ceil(total / per_page)),
    )
