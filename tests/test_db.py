"""The schema comes from the migrations, on both backends."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import insert, inspect, select

from qgate.core.db import Base, Instance, OutboxItem, Result, Series, make_engine, upgrade
from qgate.core.db.models import ModelVersion, TrainingRun
from qgate.core.storage import to_local


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


def test_migrations_0007_0008_promoted_models_and_relative_weights(
    db_url: str, tmp_path: Path
) -> None:
    """0007 backfills which families a run promoted from its reason (the last time it is
    read); 0008 stores weights and run folders relative to the storage root and the
    shipped weights as ``shipped:<file>``, and a downgrade restores absolute paths."""
    from alembic import command
    from sqlalchemy import JSON, Boolean, DateTime, Integer, Text, column, table

    from qgate.core.db.migrate import alembic_config
    from qgate.core.families import SHIPPED_WEIGHTS_DIR
    from qgate.core.registry import local_weights_path

    root = tmp_path / "var"
    runs = table(
        "training_runs",
        column("id", Integer),
        column("trigger", Text),
        column("status", Text),
        column("promoted", Boolean),
        column("reason", Text),
        column("metrics", JSON),
        column("artifacts_dir", Text),
        column("started_at", DateTime(timezone=True)),
    )
    versions = table(
        "model_versions",
        column("id", Integer),
        column("model", Text),
        column("version", Text),
        column("path", Text),
        column("sha256", Text),
        column("data_snapshot", JSON),
        column("metrics", JSON),
        column("active", Boolean),
        column("created_at", DateTime(timezone=True)),
    )
    trained = str(root / "models/run-1/mdiqa.safetensors")
    old_install = "/old/venv/lib/python3.12/site-packages/qgate/weights/mdiqa.safetensors"
    elsewhere = "/opt/weights/n2q.safetensors"
    upgrade(db_url, "0006")
    engine = make_engine(db_url)
    try:
        with engine.begin() as c:
            for i, (promoted, reason) in enumerate(
                [
                    (True, "better; Chest CT-IQA refit promoted too"),
                    (True, "better; Chest CT-IQA refit kept inactive (held-out MAE worse)"),
                    (False, "not better"),
                ],
                start=1,
            ):
                c.execute(
                    insert(runs).values(
                        id=i,
                        trigger="cli",
                        status="promoted" if promoted else "rejected",
                        promoted=promoted,
                        reason=reason,
                        metrics={},
                        artifacts_dir=str(root / f"models/run-{i}"),
                        started_at=dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
                    )
                )
            for i, path in enumerate((trained, old_install, elsewhere), start=1):
                c.execute(
                    insert(versions).values(
                        id=i,
                        model="mdiqa",
                        version=f"v{i}",
                        path=path,
                        sha256="0" * 64,
                        data_snapshot={},
                        metrics={},
                        active=False,
                        created_at=dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
                    )
                )
        upgrade(db_url, storage_root=root)
        with engine.connect() as c:
            promoted = c.execute(
                select(TrainingRun.promoted_models).order_by(TrainingRun.id)
            ).scalars()
            assert list(promoted) == [["mdiqa", "chestiqa"], ["mdiqa"], []]
            dirs = c.scalars(select(TrainingRun.artifacts_dir).order_by(TrainingRun.id)).all()
            assert dirs == ["models/run-1", "models/run-2", "models/run-3"]
            paths = c.scalars(select(ModelVersion.path).order_by(ModelVersion.id)).all()
        assert paths == ["models/run-1/mdiqa.safetensors", "shipped:mdiqa.safetensors", elsewhere]
        other = tmp_path / "mnt"  # another node's mount of the same storage
        assert [local_weights_path(p, other) for p in paths] == [
            other / "models/run-1/mdiqa.safetensors",
            SHIPPED_WEIGHTS_DIR / "mdiqa.safetensors",
            Path(elsewhere),
        ]
        command.downgrade(alembic_config(db_url, storage_root=root), "0006")
        with engine.connect() as c:
            back = c.scalars(select(versions.c.path).order_by(versions.c.id)).all()
        assert back == [trained, str(SHIPPED_WEIGHTS_DIR / "mdiqa.safetensors"), elsewhere]
    finally:
        engine.dispose()
