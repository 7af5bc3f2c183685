"""Typed dependencies shared by every router: settings, one DB session per request, the
logged-in user and role checks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db.models import User
from qgate.web.images import MapImages


class LoginRequired(Exception):
    """No valid login in this session (pages redirect to /login, the API answers 401)."""


class Forbidden(Exception):
    """Logged in, but the role does not allow this (403)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_db(request: Request) -> Iterator[Session]:
    """One session per request, closed (and rolled back if uncommitted) at its end."""
    sessions: sessionmaker[Session] = request.app.state.sessions
    with sessions() as session:
        yield session


def get_images(request: Request) -> MapImages:
    return request.app.state.images  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_db)]
ImagesDep = Annotated[MapImages, Depends(get_images)]


def password_stamp(user: User) -> str:
    """Changes whenever the password hash does, which ends the user's other sessions."""
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:16]


def get_current_user(request: Request, session: SessionDep) -> User:
    uid = request.session.get("uid")
    user = session.get(User, uid) if isinstance(uid, int) else None
    if user is None or not user.active or request.session.get("pw") != password_stamp(user):
        request.session.pop("uid", None)
        raise LoginRequired
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def require_role(*roles: str) -> Callable[[User], User]:
    """A dependency that lets only users with one of ``roles`` through."""

    def check(user: CurrentUser) -> User:
        if user.role not in roles:
            raise Forbidden(f"this needs the {' or '.join(roles)} role; you are {user.role}")
        return user

    return check


RadiologistUser = Annotated[User, Depends(require_role("radiologist"))]
AdminUser = Annotated[User, Depends(require_role("admin"))]
StaffUser = Annotated[User, Depends(require_role("radiologist", "admin"))]


def client_addr(request: Request) -> str | None:
    return request.client.host if request.client else None
