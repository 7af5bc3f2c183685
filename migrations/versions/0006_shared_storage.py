"""several nodes: events.node; stored paths relative to storage.root

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 00:00:00.000000

Paths in ``instances.path``, ``outbox.paths`` and ``results.sr_path`` become relative to
``storage.root`` so that every node can resolve them on its own mount of the shared
storage. The root is handed in by ``qgate db upgrade`` and ``qgate serve``
(``alembic_config(..., storage_root=...)``); without it (an upgrade run by hand with
Alembic) existing absolute paths stay as they are, which qgate still resolves.
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from alembic import context, op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_instances = sa.table(
    "instances", sa.column("id", sa.Integer), sa.column("path", sa.Text)
)
_outbox = sa.table("outbox", sa.column("id", sa.Integer), sa.column("paths", sa.JSON))
_results = sa.table("results", sa.column("id", sa.Integer), sa.column("sr_path", sa.Text))


def _relative(path: str, root: str) -> str:
    if not os.path.isabs(path):
        return path
    rel = os.path.relpath(path, root)
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def _convert(root: str) -> None:
    conn = op.get_bind()
    for row in conn.execute(sa.select(_instances.c.id, _instances.c.path)).all():
        new = _relative(row.path, root)
        if new != row.path:
            conn.execute(
                _instances.update().where(_instances.c.id == row.id).values(path=new)
            )
    for row in conn.execute(sa.select(_outbox.c.id, _outbox.c.paths)).all():
        paths: list[Any] = list(row.paths or [])
        new_paths = [_relative(str(p), root) for p in paths]
        if new_paths != paths:
            conn.execute(_outbox.update().where(_outbox.c.id == row.id).values(paths=new_paths))
    for row in conn.execute(
        sa.select(_results.c.id, _results.c.sr_path).where(_results.c.sr_path.is_not(None))
    ).all():
        new = _relative(row.sr_path, root)
        if new != row.sr_path:
            conn.execute(_results.update().where(_results.c.id == row.id).values(sr_path=new))


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("node", sa.String(length=128), nullable=True))
    root = context.config.attributes.get("storage_root")
    if root:
        _convert(os.path.abspath(str(root)))


def downgrade() -> None:
    root = context.config.attributes.get("storage_root")
    if root:
        base = os.path.abspath(str(root))
        conn = op.get_bind()
        for row in conn.execute(sa.select(_instances.c.id, _instances.c.path)).all():
            if not os.path.isabs(row.path):
                conn.execute(
                    _instances.update()
                    .where(_instances.c.id == row.id)
                    .values(path=os.path.join(base, row.path))
                )
        for row in conn.execute(sa.select(_outbox.c.id, _outbox.c.paths)).all():
            paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in row.paths or []]
            conn.execute(_outbox.update().where(_outbox.c.id == row.id).values(paths=paths))
        for row in conn.execute(
            sa.select(_results.c.id, _results.c.sr_path).where(_results.c.sr_path.is_not(None))
        ).all():
            if not os.path.isabs(row.sr_path):
                conn.execute(
                    _results.update()
                    .where(_results.c.id == row.id)
                    .values(sr_path=os.path.join(base, row.sr_path))
                )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_column("node")
