"""Run Alembic programmatically, so ``qgate db upgrade`` needs no alembic.ini in the cwd.

The script directory is the top-level ``migrations`` package (``migrations/`` in the
repository), which the wheel ships beside ``qgate``; it is located through
:mod:`importlib.resources`, so an installed qgate migrates from any working directory.
"""

from __future__ import annotations

import importlib
from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

MIGRATIONS_PACKAGE = "migrations"


class MigrationsNotFound(RuntimeError):
    """qgate's migrations package is missing or shadowed by another ``migrations``."""


def migrations_dir() -> Path:
    """The folder of qgate's Alembic scripts (``env.py``, ``versions/``).

    Raises
    ------
    MigrationsNotFound
        When ``migrations`` cannot be imported, is another project's package, or is not
        a plain folder on disk (Alembic reads the scripts by path).
    """
    try:
        package = importlib.import_module(MIGRATIONS_PACKAGE)
    except ImportError as exc:
        raise MigrationsNotFound(
            "qgate's migrations package is not installed; reinstall qgate "
            "(an editable install made before migrations/ became a package needs "
            "`pip install -e .` again)"
        ) from exc
    if getattr(package, "OWNER", None) != "qgate":
        raise MigrationsNotFound(
            f"the 'migrations' package at {getattr(package, '__file__', '?')} is not "
            "qgate's (another project's migrations/ shadows it, e.g. from the working "
            "directory)"
        )
    path = Path(str(files(package)))
    if not (path / "env.py").is_file():
        raise MigrationsNotFound(f"qgate's migrations are not a folder on disk: {path}")
    return path


def alembic_config(url: str, *, storage_root: Path | None = None) -> Config:
    """Alembic's configuration for ``url``; ``storage_root`` lets migrations 0006 and 0008
    make the stored paths relative to it."""
    cfg = Config()
    if storage_root is not None:
        cfg.attributes["storage_root"] = str(storage_root)
    cfg.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolation would eat a literal '%' in a password.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head", *, storage_root: Path | None = None) -> None:
    """Bring the database at ``url`` up to ``revision``. Pass the node's ``storage_root``
    so that paths recorded before migrations 0006 and 0008 are made relative to it."""
    command.upgrade(alembic_config(url, storage_root=storage_root), revision)


def schema_problem(engine: Engine) -> str | None:
    """Why the database behind ``engine`` cannot be used by this qgate, or None."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    where = engine.url.render_as_string(hide_password=True)
    head = ScriptDirectory(str(migrations_dir())).get_current_head()
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        return f"cannot open the database {where}: {exc}"
    if current == head:
        return None
    if current is None:
        return f"the database {where} has no qgate schema; run `qgate db upgrade` first"
    return (
        f"the database {where} is at migration {current}, this qgate needs {head}; "
        "run `qgate db upgrade`"
    )
