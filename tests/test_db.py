"""The schema comes from the migrations, on both backends."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import insert, inspect, select

from qgate.db import Base, Instance, OutboxItem, Result, Series, make_engine, upgrade
from qgate.storage import to_local


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


def test_migration_0006_stores_paths_relative_to_the_storage_root(
    db_url: str, tmp_path: Path
) -> None:
    """Rows written with absolute paths (before 0006) are made relative to the node's
    storage root; a path outside it stays absolute (and still resolves)."""
    root = tmp_path / "var"
    inside, outside = str(root / "spool/1.2/3.dcm"), "/elsewhere/spool/1.2/4.dcm"
    upgrade(db_url, "0005")
    engine = make_engine(db_url)
    try:
        with engine.begin() as c:
            c.execute(insert(Series).values(series_instance_uid="1.2", study_instance_uid="1"))
            for n, path in enumerate((inside, outside), start=3):
                c.execute(
                    insert(Instance).values(
                        sop_instance_uid=f"{n}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        series_instance_uid="1.2",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        path=path,
                        size=1,
                    )
                )
            c.execute(
                insert(OutboxItem).values(
                    series_instance_uid="1.2",
                    kind="forward",
                    dest_ae_title="A",
                    dest_host="h",
                    dest_port=1,
                    paths=[inside, outside],
                )
            )
            c.execute(
                insert(Result).values(
                    series_instance_uid="1.2",
                    generation=0,
                    decision="pass",
                    reasons=[],
                    scores={},
                    scorer_versions={},
                    slices_scored=1,
                    seconds=0.1,
                    sr_path=str(root / "outgoing/1.2/g0-j1/sr.dcm"),
                )
            )
        upgrade(db_url, storage_root=root)
        with engine.connect() as c:
            paths = c.scalars(select(Instance.path).order_by(Instance.id)).all()
            sends = c.scalar(select(OutboxItem.paths))
            sr = c.scalar(select(Result.sr_path))
    finally:
        engine.dispose()
    assert paths == sends == ["spool/1.2/3.dcm", outside]
    assert sr == "outgoing/1.2/g0-j1/sr.dcm"
    assert [to_local(p, root) for p in paths] == [Path(inside), Path(outside)]
