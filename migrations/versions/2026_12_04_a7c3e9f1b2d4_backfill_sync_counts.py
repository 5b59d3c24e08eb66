"""A backfill records what its last whole run found: unchanged, new, changed and removed ids

A backfill run is now a sync: it embeds new ids and ids whose text changed, and counts (or with
--prune removes) ids gone from the source. Those counts belong to the run, not the job, so the
backfill row keeps the last one for `embedq backfill NAME` to show.

Revision ID: a7c3e9f1b2d4
Revises: f3a9d6b2c7e1
Create Date: 2026-12-04 06:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a7c3e9f1b2d4"
down_revision: str | None = "f3a9d6b2c7e1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("backfills") as batch:
        batch.add_column(sa.Column("last_sync", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("backfills") as batch:
        batch.drop_column("last_sync")
