"""The schema comes from the migrations, on both backends."""

from __future__ import annotations

from sqlalchemy import inspect

from qgate.db import Base, make_engine, upgrade


def test_migrations_create_the_whole_schema(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        assert "alembic_version" in tables
        for name, table in Base.metadata.tables.items():
            cols = {c["name"] for c in inspect(engine).get_columns(name)}
            assert {c.name for c in table.columns} == cols, name
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()
