"""A throwaway PostgreSQL server for the test session.

PostgreSQL refuses to run as root, and CI runs as root, so when we are root the server
runs as the ``postgres`` system user (``runuser``). It listens on loopback only, with
trust authentication, in a temporary data directory that is deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg


def _bindir() -> Path:
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _as_pg_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres_server(port: int) -> Iterator[str]:
    """Start a server on ``port``; yields a base URL without a database name."""
    bindir = _bindir()
    workdir = Path(tempfile.mkdtemp(prefix="qgate-pg-"))
    data = workdir / "data"
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    subprocess.run(
        _as_pg_user(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        ),
        check=True,
        capture_output=True,
    )
    opts = f"-h 127.0.0.1 -p {port} -k {workdir} -c fsync=off -c synchronous_commit=off"
    subprocess.run(
        _as_pg_user(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                opts,
                "-w",
                "-l",
                str(workdir / "log"),
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        base = f"postgresql+psycopg://postgres@127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres").close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield base
    finally:
        subprocess.run(
            _as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(workdir, ignore_errors=True)


def create_database(base_url: str) -> str:
    """Create a fresh, empty database; returns its SQLAlchemy URL."""
    name = f"qgate_{uuid.uuid4().hex[:12]}"
    raw = base_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(f"{raw}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base_url}/{name}"
