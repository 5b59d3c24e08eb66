"""failed_items.kind and jobs.error_kind: what kind of failure each reason is (input, model,
worker, unavailable, lost, internal), so readers tell failures apart without reading the text

Revision ID: d4f7a2c9e1b6
Revises: c8e2a6d4f1b3
Create Date: 2026-12-02 15:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d4f7a2c9e1b6"
down_revision: str | None = "c8e2a6d4f1b3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = ("input", "model", "worker", "unavailable", "lost", "internal")


def _kind() -> sa.Enum:
    return sa.Enum(*KINDS, name="failure_kind", native_enum=False, length=20)


def upgrade() -> None:
    with op.batch_alter_table("failed_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", _kind(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("error_kind", _kind(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("error_kind")
    with op.batch_alter_table("failed_items", schema=None) as batch_op:
        batch_op.drop_column("kind")
