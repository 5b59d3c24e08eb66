"""backfills: sent batches, failed items, the content cache; jobs gain reused_items and sealed

Revision ID: e1940ce2bdbc
Revises: 6b239207581a
Create Date: 2026-11-26 16:51:39.923390
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e1940ce2bdbc"
down_revision: str | None = "6b239207581a"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "backfills",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_backfills_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_backfills")),
    )
    op.create_table(
        "batches",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("batch_index", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "sent",
                "done",
                "failed",
                "abandoned",
                name="batch_state",
                native_enum=False,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("item_ids", sa.JSON(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_batches_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
        sa.UniqueConstraint("job_id", "batch_index", name=op.f("uq_batches_job_id_batch_index")),
    )
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_batches_state"), ["state"], unique=False)

    op.create_table(
        "failed_items",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("item_id", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_failed_items_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_failed_items")),
        sa.UniqueConstraint("job_id", "item_id", name=op.f("uq_failed_items_job_id_item_id")),
    )
    op.create_table(
        "vector_cache",
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("text_sha256", sa.String(length=64), nullable=False),
        sa.Column(
            "embedding_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["embedding_id"],
            ["embeddings.id"],
            name=op.f("fk_vector_cache_embedding_id_embeddings"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("model_name", "text_sha256", name=op.f("pk_vector_cache")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("reused_items", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("sealed", sa.Boolean(), server_default=sa.true(), nullable=False)
        )


def downgrade() -> None:

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("sealed")
        batch_op.drop_column("reused_items")

    op.drop_table("vector_cache")
    op.drop_table("failed_items")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_batches_state"))

    op.drop_table("batches")
    op.drop_table("backfills")
