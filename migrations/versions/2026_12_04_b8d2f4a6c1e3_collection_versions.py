"""A backfill is a collection with versions: one job per model file it was built with

A migration to another model builds a new version beside the current one, which readers keep
until `embedq collection NAME use VERSION`; the backfill's job_id names the current version.
Each existing backfill becomes version 1 of its collection, its job's model file recorded.

Revision ID: b8d2f4a6c1e3
Revises: a7c3e9f1b2d4
Create Date: 2026-12-04 09:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b8d2f4a6c1e3"
down_revision: str | None = "a7c3e9f1b2d4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "collection_versions",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=True),
        sa.Column("index_table", sa.String(63), nullable=True),
        sa.Column("dim", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["name"],
            ["backfills.name"],
            name=op.f("fk_collection_versions_name_backfills"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_collection_versions_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("name", "version", name=op.f("pk_collection_versions")),
        sa.UniqueConstraint("job_id", name=op.f("uq_collection_versions_job_id")),
    )
    op.execute(
        "INSERT INTO collection_versions (name, version, job_id, model_name, model_sha256,"
        " created_at) SELECT b.name, 1, b.job_id, b.model_name, j.model_sha256, b.created_at"
        " FROM backfills b JOIN jobs j ON j.id = b.job_id"
    )


def downgrade() -> None:
    op.drop_table("collection_versions")
