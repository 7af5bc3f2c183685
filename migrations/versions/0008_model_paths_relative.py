"""model_versions.path and training_runs.artifacts_dir relative to storage.root

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 03:10:00.000000

As migration 0006 did for the spool and outgoing paths: a weights file under
``storage.root`` (a retraining run's ``models/run-<id>/...``) is stored relative to it, so
that every node resolves it on its own mount. The shipped weights
(``.../qgate/weights/<file>``, in each node's own installation) become
``shipped:<file>``. The root is handed in by ``qgate db upgrade`` and ``qgate serve``;
without it only the shipped weights are converted, and the absolute paths left still
resolve (:func:`qgate.core.registry.local_weights_path`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import sqlalchemy as sa
from alembic import context, op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SHIPPED_PREFIX = "shipped:"
_SHIPPED_DIR = os.path.join("qgate", "weights")

_versions = sa.table("model_versions", sa.column("id", sa.Integer), sa.column("path", sa.Text))
_runs = sa.table("training_runs", sa.column("id", sa.Integer), sa.column("artifacts_dir", sa.Text))


def _relative(path: str, root: str | None) -> str:
    if not os.path.isabs(path):
        return path
    if os.path.dirname(path).endswith(os.sep + _SHIPPED_DIR):
        return SHIPPED_PREFIX + os.path.basename(path)
    if root is None:
        return path
    rel = os.path.relpath(path, root)
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def _absolute(path: str, root: str | None) -> str:
    if path.startswith(SHIPPED_PREFIX):
        from qgate.core.families import SHIPPED_WEIGHTS_DIR

        return str(SHIPPED_WEIGHTS_DIR / path.removeprefix(SHIPPED_PREFIX))
    return path if os.path.isabs(path) or root is None else os.path.join(root, path)


def _rewrite(convert: Callable[[str], str]) -> None:
    conn = op.get_bind()
    for table, col in ((_versions, _versions.c.path), (_runs, _runs.c.artifacts_dir)):
        for row in conn.execute(sa.select(table.c.id, col).where(col.is_not(None))).all():
            old = row[1]
            new = convert(old)
            if new != old:
                conn.execute(table.update().where(table.c.id == row.id).values({col.name: new}))


def upgrade() -> None:
    root = context.config.attributes.get("storage_root")
    base = os.path.abspath(str(root)) if root else None
    _rewrite(lambda p: _relative(p, base))


def downgrade() -> None:
    root = context.config.attributes.get("storage_root")
    base = os.path.abspath(str(root)) if root else None
    _rewrite(lambda p: _absolute(p, base))
