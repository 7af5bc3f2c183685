"""Cluster-wide locks for work that must run once, not once per node (the retraining).

PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) held on a connection
of its own for as long as the work runs; it is released when the work ends and, should
the process die, when its connection closes. SQLite is one machine's database: an
exclusive ``flock`` on a file beside the database file does the same for every process
on that machine (an in-memory database has one process: a lock in the process).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, func, select

_LOCAL: dict[str, threading.Lock] = {}
_LOCAL_GUARD = threading.Lock()


def lock_key(name: str) -> int:
    """The advisory-lock key of ``name``: a signed 64-bit integer, stable across nodes."""
    return int.from_bytes(hashlib.sha256(f"qgate:{name}".encode()).digest()[:8], "big", signed=True)


@contextmanager
def cluster_lock(engine: Engine, name: str) -> Iterator[bool]:
    """Try to take the lock ``name`` for the database behind ``engine``, without waiting.

    Yields True when this process holds it for the ``with`` block, False when another
    process (on any node sharing the database) holds it; the block then should not do
    the work.
    """
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            key = lock_key(name)
            held = bool(conn.scalar(select(func.pg_try_advisory_lock(key))))
            conn.commit()
            try:
                yield held
            finally:
                if held:
                    conn.scalar(select(func.pg_advisory_unlock(key)))
                    conn.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":
        with _LOCAL_GUARD:
            lock = _LOCAL.setdefault(name, threading.Lock())
        held = lock.acquire(blocking=False)
        try:
            yield held
        finally:
            if held:
                lock.release()
        return
    fd = os.open(f"{database}.{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        yield held  # the lock goes with the descriptor, closed below
    finally:
        os.close(fd)
