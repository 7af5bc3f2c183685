"""training_runs.promoted_models: which families a run promoted, as data

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 03:00:00.000000

The training page used to search a run's free-text reason to tell whether Chest CT-IQA's
refit went along with a promotion. The families a run activated are now a column; this
backfills it from the runs recorded before (the one time the reason is read).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: What qgate.retrain appended to a promoted run's reason before this column existed.
_CHEST_PROMOTED = "Chest CT-IQA refit promoted too"

_runs = sa.table(
    "training_runs",
    sa.column("id", sa.Integer),
    sa.column("promoted", sa.Boolean),
    sa.column("reason", sa.Text),
    sa.column("promoted_models", sa.JSON),
)


def upgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("promoted_models", sa.JSON(), nullable=True))
    conn = op.get_bind()
    for row in conn.execute(sa.select(_runs.c.id, _runs.c.promoted, _runs.c.reason)).all():
        models = []
        if row.promoted:
            models.append("mdiqa")
            if _CHEST_PROMOTED in (row.reason or ""):
                models.append("chestiqa")
        conn.execute(_runs.update().where(_runs.c.id == row.id).values(promoted_models=models))
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.alter_column("promoted_models", existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_column("promoted_models")
