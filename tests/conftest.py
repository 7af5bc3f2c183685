"""Shared fixtures: a migrated SQL store per test (SQLite and PostgreSQL), free ports.

Every test that takes ``db_url`` (directly or through ``settings``) runs twice: on SQLite
and on a throwaway PostgreSQL server started once per session.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings, load_settings
from qgate.core.db import make_engine, make_session_factory, upgrade
from tests.support.postgres import create_database, postgres_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def pg_base_url() -> Iterator[str]:
    with postgres_server(free_port()) as base:
        yield base


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'qgate.db'}"
    return create_database(request.getfixturevalue("pg_base_url"))


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    """Settings on a fresh, migrated database and a private storage root."""
    upgrade(db_url)
    return load_settings(
        path=None,
        database={"url": db_url},
        storage={"root": tmp_path / "var", "fsync": False},
        dicom={"port": free_port(), "host": "127.0.0.1"},
        series={"stable_seconds": 2.0, "release_grace_seconds": 0.5, "poll_seconds": 0.2},
    )


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.database.url)
    yield make_session_factory(engine, node=settings.node_name)
    engine.dispose()
