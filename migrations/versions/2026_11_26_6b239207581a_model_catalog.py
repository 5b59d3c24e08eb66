"""model catalog: where worker hosts that lack a model prepare it from

Revision ID: 6b239207581a
Revises: 6929c96d42eb
Create Date: 2026-11-26 16:05:35.689236
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6b239207581a"
down_revision: str | None = "6929c96d42eb"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_sources",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_model_sources")),
    )


def downgrade() -> None:
    op.drop_table("model_sources")
