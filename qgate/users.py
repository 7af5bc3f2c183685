"""Review-app users: creation, password hashing (argon2id) and authentication.

Shared by ``qgate user add`` and the web app (:mod:`qgate.web`), so it needs neither.
"""

from __future__ import annotations

import functools
from typing import Literal, get_args

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qgate.db.models import AuditEntry, User, utcnow

Role = Literal["radiologist", "admin"]
ROLES: tuple[str, ...] = get_args(Role)
MIN_PASSWORD_LENGTH = 8
_USERNAME_MAX = 64

# argon2-cffi's defaults follow RFC 9106's second recommended option (argon2id, 64 MiB).
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user is unknown: a wrong name costs what a wrong password does."""
    return _hasher.hash("qgate-no-such-user")


class UserError(ValueError):
    """A user cannot be created as asked (bad name, role or password, or a duplicate)."""


def hash_password(password: str) -> str:
    """An argon2id PHC string for ``password``."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``; never raises on a bad hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def check_password(password: str) -> None:
    """Raise :class:`UserError` when ``password`` is too weak to store."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if password != password.strip():
        raise UserError("the password must not start or end with white space")


def get_user(session: Session, *, username: str) -> User | None:
    """The user called ``username`` (case-insensitive), or None."""
    return session.scalar(select(User).where(func.lower(User.username) == username.lower()))


def create_user(
    session: Session,
    *,
    username: str,
    password: str,
    role: str,
    by: str = "cli",
) -> User:
    """Add a user and its ``user_add`` audit row; the caller commits.

    Raises
    ------
    UserError
        For an empty or too long name, an unknown role, a weak password or a name in use.
    """
    username = username.strip()
    if not username or len(username) > _USERNAME_MAX or any(c.isspace() for c in username):
        raise UserError(f"a user name is 1-{_USERNAME_MAX} characters without spaces")
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
    check_password(password)
    if get_user(session, username=username) is not None:
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role, active=True)
    session.add(user)
    session.flush()
    session.add(
        AuditEntry(
            user_id=None,
            username=by,
            action="user_add",
            detail={"username": username, "role": role, "user_id": user.id},
        )
    )
    return user


def authenticate(session: Session, *, username: str, password: str) -> User | None:
    """The active user with this name and password, or None. Upgrades stale hashes."""
    user = get_user(session, username=username)
    if user is None or not user.active:
        verify_password(_dummy_hash(), password)
        return None
    if not verify_password(user.password_hash, password):
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.last_login_at = utcnow()
    return user
