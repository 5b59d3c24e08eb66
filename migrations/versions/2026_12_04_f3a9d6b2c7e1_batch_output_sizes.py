"""A batch's output and error files have their sizes recorded when it ends

GET /v1/files/{id} of a batch's output file counted its bytes by writing the whole file from
the store (167 s for 1.67 GB); the runner now records both sizes once, as the batch ends.
Batches that ended before have none and are measured once on their first request.

Revision ID: f3a9d6b2c7e1
Revises: e5b8c1d7f2a9
Create Date: 2026-12-04 04:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f3a9d6b2c7e1"
down_revision: str | None = "e5b8c1d7f2a9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_batches") as batch:
        batch.add_column(sa.Column("output_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("error_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_batches") as batch:
        batch.drop_column("error_bytes")
        batch.drop_column("output_bytes")
