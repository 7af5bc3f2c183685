"""failure policy and degraded results: series.forwarded_generation, results.skipped_parts

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("forwarded_generation", sa.Integer(), nullable=True))
    # Results scored before this revision skipped nothing: the server default fills them.
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("skipped_parts", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("skipped_parts")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("forwarded_generation")
