"""``/api/me``, ``/api/users`` (admin: list, add, disable/enable, reset password, unlock),
``/api/audit`` (admin) and ``/api/models/{version}/activate`` (admin: serve or roll back to
a model version, as ``qgate models activate``). Every change is audited in its transaction."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from qgate.core.db.models import ModelVersion, User
from qgate.core.registry import RegistryError, activate, active_weights
from qgate.web import crud
from qgate.web.deps import AdminUser, CurrentUser, SessionDep, SettingsDep, client_addr
from qgate.web.schemas import AuditEntryPublic, AuditPage, Me, UserCreate, UserPublic
from qgate.web.security import csrf_token
from qgate.web.users import (
    UserError,
    create_user,
    get_user,
    reset_password,
    set_active,
    unlock_user,
)

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


class PasswordReset(BaseModel):
    password: str = Field(min_length=8, max_length=1024)


def _change(session: SessionDep, username: str, change: Callable[[], User]) -> UserPublic:
    if get_user(session, username=username) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no user {username!r}")
    try:
        changed = change()
    except UserError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    session.commit()
    return UserPublic.model_validate(changed)


@router.post("/users/{username}/disable", response_model=UserPublic)
def disable_user(username: str, session: SessionDep, user: AdminUser) -> UserPublic:
    """Disable a user: no logins, open sessions end (audited). Admins only."""
    return _change(
        session,
        username,
        lambda: set_active(session, username=username, active=False, by=user.username),
    )


@router.post("/users/{username}/enable", response_model=UserPublic)
def enable_user(username: str, session: SessionDep, user: AdminUser) -> UserPublic:
    """Re-enable a disabled user (audited). Admins only."""
    return _change(
        session,
        username,
        lambda: set_active(session, username=username, active=True, by=user.username),
    )


@router.post("/users/{username}/password", response_model=UserPublic)
def reset_user_password(
    username: str, body: PasswordReset, session: SessionDep, user: AdminUser
) -> UserPublic:
    """Set a new password; the user's sessions end (audited, without the password)."""
    return _change(
        session,
        username,
        lambda: reset_password(
            session, username=username, password=body.password, by=user.username
        ),
    )


@router.post("/users/{username}/unlock", response_model=UserPublic)
def unlock(username: str, session: SessionDep, user: AdminUser) -> UserPublic:
    """Forget the failed logins that throttle this user name (audited). Admins only."""
    return _change(
        session, username, lambda: unlock_user(session, username=username, by=user.username)
    )


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


class ModelActivated(BaseModel):
    model: str
    version: str
    previous: str = Field(description="the version served before")
    activated_at: dt.datetime | None


def activate_model(
    session: Session, *, root: Path, user: User, version: str, remote_addr: str | None
) -> tuple[ModelVersion, str]:
    """Serve ``version`` from the next scoring job on (:func:`qgate.core.registry.activate`, the
    checksum verified), audited as ``model_activate`` in the same transaction; commits.
    Returns the row and the version served before. :class:`crud.NotFound` for an unknown
    version, :class:`RegistryError` for weights that are missing or do not match."""
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is None:
        raise crud.NotFound(f"no such model version: {version}")
    previous = active_weights(session, root=root)[row.model].version
    crud.audit(
        session,
        user=user,
        action="model_activate",
        detail={"model": row.model, "version": version, "previous": previous},
        remote_addr=remote_addr,
    )
    try:
        return activate(session, version, root=root), previous  # commits the audit row too
    except RegistryError:
        session.rollback()
        raise


@router.post("/models/{version}/activate", response_model=ModelActivated)
def activate_model_version(
    version: str, request: Request, settings: SettingsDep, session: SessionDep, user: AdminUser
) -> ModelActivated:
    """Serve ``version`` of its model from the next scoring job on; an older version rolls
    back (audited). Admins only. 404 for an unknown version, 409 when its weights are
    missing or do not match their checksum."""
    try:
        row, previous = activate_model(
            session,
            root=settings.storage.root,
            user=user,
            version=version,
            remote_addr=client_addr(request),
        )
    except crud.NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except RegistryError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    return ModelActivated(
        model=row.model, version=row.version, previous=previous, activated_at=row.activated_at
    )
