"""batch_stats.precision: the arithmetic a batch really ran in (a bf16 model on a CPU without
bf16 runs fp32)

Revision ID: b3d1f0c4e9a7
Revises: a7c3e5f1d2b4
Create Date: 2026-11-29 05:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b3d1f0c4e9a7"
down_revision: str | None = "a7c3e5f1d2b4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batch_stats", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("precision", sa.String(length=16), server_default="fp32", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("batch_stats", schema=None) as batch_op:
        batch_op.drop_column("precision")
