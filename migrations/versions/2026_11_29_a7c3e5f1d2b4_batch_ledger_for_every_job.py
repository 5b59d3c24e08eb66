"""batch ledger for every job: payload, attempts, sends, last error, worker, updated_at; leases;
server defaults on jobs

Revision ID: a7c3e5f1d2b4
Revises: e1940ce2bdbc
Create Date: 2026-11-29 02:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a7c3e5f1d2b4"
down_revision: str | None = "e1940ce2bdbc"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("item_count", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("payload", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("sends", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("worker", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
    # Backfill batches sent before the ledger: their attempt number is how often they were sent.
    op.execute("UPDATE batches SET sends = attempt, updated_at = sent_at")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.alter_column(
            "updated_at", existing_type=sa.DateTime(timezone=True), nullable=False
        )
        batch_op.drop_column("attempt")
        batch_op.drop_index("ix_batches_state")
        batch_op.create_index("ix_batches_state_updated_at", ["state", "updated_at"], unique=False)

    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )

    with op.batch_alter_table("backfills", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("duplicates", sa.Integer(), server_default="0", nullable=False)
        )

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("state", existing_type=sa.String(20), server_default="queued")
        for column in ("total_items", "done_items", "failed_items"):
            batch_op.alter_column(column, existing_type=sa.Integer(), server_default="0")
        batch_op.alter_column("meta", existing_type=sa.JSON(), server_default="{}")
        batch_op.alter_column(
            "created_at", existing_type=sa.DateTime(timezone=True), server_default=sa.func.now()
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for column in ("state", "total_items", "done_items", "failed_items", "meta"):
            batch_op.alter_column(column, server_default=None)
        batch_op.alter_column("created_at", server_default=None)
    op.drop_table("leases")
    with op.batch_alter_table("backfills", schema=None) as batch_op:
        batch_op.drop_column("duplicates")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt", sa.Integer(), server_default="1", nullable=False))
    op.execute("UPDATE batches SET attempt = sends")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index("ix_batches_state_updated_at")
        batch_op.create_index("ix_batches_state", ["state"], unique=False)
        for column in ("updated_at", "worker", "last_error", "sends", "attempts", "payload"):
            batch_op.drop_column(column)
        batch_op.drop_column("item_count")
