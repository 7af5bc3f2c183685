"""Review-app users: creation, password hashing (argon2id), authentication, disabling,
password resets and login throttling.

Shared by ``qgate user ...`` and the web app (:mod:`qgate.web`), so it needs neither.
Every change adds its audit row to the caller's transaction.

Throttling (:func:`login_throttle`) counts ``login_failed`` audit rows, so it needs no
state of its own and holds across nodes and restarts: per typed user name (known or
not, so a lock does not reveal which names exist), since the later of the window's start,
that user's last successful login and the last unlock, password reset or re-enable by
an admin; and per client address.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from typing import Literal, get_args

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qgate.core.config import WebConfig
from qgate.core.db.models import AuditEntry, User, utcnow

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


#: Admin actions after which a user name's earlier failed logins no longer count.
UNLOCKING_ACTIONS: tuple[str, ...] = ("user_unlock", "password_reset", "user_enable")


def _existing(session: Session, username: str) -> User:
    user = get_user(session, username=username)
    if user is None:
        raise UserError(f"no user {username!r}")
    return user


def _audit(session: Session, by: str, action: str, user: User, **extra: object) -> None:
    session.add(
        AuditEntry(
            user_id=None,
            username=by,
            action=action,
            detail={"username": user.username, "user_id": user.id, **extra},
        )
    )


def set_active(session: Session, *, username: str, active: bool, by: str = "cli") -> User:
    """Disable (``active=False``) or re-enable a user, audited; the caller commits.

    A disabled user cannot log in and its open sessions end at their next request. The
    last active admin cannot be disabled (nobody could undo it from the web app).
    """
    user = _existing(session, username)
    if user.active == active:
        raise UserError(f"user {user.username!r} is already {'enabled' if active else 'disabled'}")
    if not active and user.role == "admin":
        admins = session.scalar(
            select(func.count(User.id)).where(User.role == "admin", User.active.is_(True))
        )
        if (admins or 0) <= 1:
            raise UserError(f"{user.username!r} is the last active admin")
    user.active = active
    _audit(session, by, "user_enable" if active else "user_disable", user)
    return user


def reset_password(session: Session, *, username: str, password: str, by: str = "cli") -> User:
    """Set a new password, audited (without the password); the caller commits.

    The user's sessions end (their cookie carries a stamp of the old hash), and earlier
    failed logins of the name stop counting.
    """
    user = _existing(session, username)
    check_password(password)
    user.password_hash = hash_password(password)
    _audit(session, by, "password_reset", user)
    return user


def unlock_user(session: Session, *, username: str, by: str = "cli") -> User:
    """Forget the failed logins of a throttled user name, audited; the caller commits."""
    user = _existing(session, username)
    _audit(session, by, "user_unlock", user)
    return user


@dataclass(frozen=True)
class Throttle:
    """Why a login attempt is refused before its password is checked, and for how long."""

    scope: Literal["user", "address"]
    retry_after: dt.timedelta

    @property
    def message(self) -> str:
        minutes = max(1, round(self.retry_after.total_seconds() / 60))
        who = "this user name" if self.scope == "user" else "this address"
        return f"Too many failed logins for {who}. Try again in {minutes} min."


def _lock_remaining(
    times: list[dt.datetime], limit: int, window: dt.timedelta, now: dt.datetime
) -> dt.timedelta | None:
    """How long until fewer than ``limit`` of ``times`` lie within ``window`` of now."""
    if len(times) < limit:
        return None
    times = sorted(times)
    # The lock lifts when the failure that makes the count reach ``limit`` leaves the window.
    return max(dt.timedelta(seconds=1), times[len(times) - limit] + window - now)


def login_throttle(
    session: Session,
    *,
    username: str,
    remote_addr: str | None,
    web: WebConfig,
    now: dt.datetime | None = None,
) -> Throttle | None:
    """A :class:`Throttle` if this attempt must be refused, else None."""
    now = now or utcnow()
    window = dt.timedelta(minutes=web.login_window_minutes)
    start = now - window
    name = username.strip().lower()[:_USERNAME_MAX]
    since = start
    user = get_user(session, username=name)
    if user is not None and user.last_login_at is not None:
        since = max(since, user.last_login_at)
    admin_rows = session.scalars(
        select(AuditEntry).where(AuditEntry.action.in_(UNLOCKING_ACTIONS), AuditEntry.at >= start)
    )
    for row in admin_rows:
        if str(row.detail.get("username", "")).lower() == name:
            since = max(since, row.at)
    failed_user = list(
        session.scalars(
            select(AuditEntry.at).where(
                AuditEntry.action == "login_failed",
                func.lower(AuditEntry.username) == name,
                AuditEntry.at > since,
            )
        )
    )
    remaining = _lock_remaining(failed_user, web.login_max_failures, window, now)
    if remaining is not None:
        return Throttle("user", remaining)
    if remote_addr:
        failed_addr = list(
            session.scalars(
                select(AuditEntry.at).where(
                    AuditEntry.action == "login_failed",
                    AuditEntry.remote_addr == remote_addr,
                    AuditEntry.at > start,
                )
            )
        )
        remaining = _lock_remaining(failed_addr, web.login_max_failures_per_address, window, now)
        if remaining is not None:
            return Throttle("address", remaining)
    return None
