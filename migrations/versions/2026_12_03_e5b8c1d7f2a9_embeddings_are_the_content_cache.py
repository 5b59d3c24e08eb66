"""The content cache is the embeddings table's text_sha256 index: vector_cache goes

A batch wrote each of its vectors twice (the embedding, then a vector_cache row pointing at it,
which needed the embeddings' ids back from the insert): the second write cost about as much as
the first and kept the bulk write (COPY) from being used. The stored embeddings, found by their
indexed text sha256 and their job's model, answer the same question.

Revision ID: e5b8c1d7f2a9
Revises: d4f7a2c9e1b6
Create Date: 2026-12-03 07:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e5b8c1d7f2a9"
down_revision: str | None = "d4f7a2c9e1b6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_table("vector_cache")


def downgrade() -> None:
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
    op.execute(  # the first stored vector of each text under each model, as the cache kept
        "INSERT INTO vector_cache (model_name, text_sha256, embedding_id)"
        " SELECT jobs.model_name, embeddings.text_sha256, MIN(embeddings.id)"
        " FROM embeddings JOIN jobs ON jobs.id = embeddings.job_id"
        " GROUP BY jobs.model_name, embeddings.text_sha256"
    )
