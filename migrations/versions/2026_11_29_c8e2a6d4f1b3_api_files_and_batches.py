"""api_files, api_batches, api_batch_requests: OpenAI's Files and Batches over the API

Revision ID: c8e2a6d4f1b3
Revises: b3d1f0c4e9a7
Create Date: 2026-11-29 08:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c8e2a6d4f1b3"
down_revision: str | None = "b3d1f0c4e9a7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_files",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", STAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_files")),
    )
    op.create_index(op.f("ix_api_files_owner"), "api_files", ["owner"], unique=False)
    op.create_table(
        "api_batches",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("input_file_id", sa.String(length=64), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("completion_window", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("output_file_id", sa.String(length=64), nullable=True),
        sa.Column("error_file_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", STAMP, nullable=False),
        sa.Column("expires_at", STAMP, nullable=False),
        sa.Column("in_progress_at", STAMP, nullable=True),
        sa.Column("finalizing_at", STAMP, nullable=True),
        sa.Column("completed_at", STAMP, nullable=True),
        sa.Column("failed_at", STAMP, nullable=True),
        sa.Column("expired_at", STAMP, nullable=True),
        sa.Column("cancelling_at", STAMP, nullable=True),
        sa.Column("cancelled_at", STAMP, nullable=True),
        sa.ForeignKeyConstraint(
            ["input_file_id"],
            ["api_files.id"],
            name=op.f("fk_api_batches_input_file_id_api_files"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_batches")),
    )
    op.create_index(op.f("ix_api_batches_owner"), "api_batches", ["owner"], unique=False)
    op.create_index(op.f("ix_api_batches_status"), "api_batches", ["status"], unique=False)
    op.create_table(
        "api_batch_requests",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("line", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("custom_id", sa.String(length=200), nullable=True),
        sa.Column("inputs", sa.Integer(), nullable=False),
        sa.Column("base64", sa.Boolean(), nullable=False),
        sa.Column("error_code", sa.String(length=50), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["api_batches.id"],
            name=op.f("fk_api_batch_requests_batch_id_api_batches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("batch_id", "line", name=op.f("pk_api_batch_requests")),
    )
    op.create_index(
        "ix_api_batch_requests_custom_id",
        "api_batch_requests",
        ["batch_id", "custom_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_api_batch_requests_custom_id", table_name="api_batch_requests")
    op.drop_table("api_batch_requests")
    op.drop_index(op.f("ix_api_batches_status"), table_name="api_batches")
    op.drop_index(op.f("ix_api_batches_owner"), table_name="api_batches")
    op.drop_table("api_batches")
    op.drop_index(op.f("ix_api_files_owner"), table_name="api_files")
    op.drop_table("api_files")
