"""Queries, shaped as the tasks ask them. Functions take the session first and never commit:
the caller's session scope does.

Writes that a redelivered batch may repeat are dialect upserts (``INSERT .. ON CONFLICT``), so
at-least-once delivery never duplicates a row; SQLAlchemy has no dialect-neutral upsert, so the
statement is picked by the session's dialect here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Insert, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import Embedding, Job


def _insert(session: Session, table: Any) -> Insert:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"embedq stores on SQLite or PostgreSQL, not {dialect}")


def upsert_embeddings(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Insert embedding rows, skipping (job, item) pairs already stored; returns rows inserted."""
    if not rows:
        return 0
    insert: Any = _insert(session, Embedding).values(list(rows))
    # RETURNING yields only the rows this statement inserted (PostgreSQL; SQLite >= 3.35).
    statement = insert.on_conflict_do_nothing(index_elements=["job_id", "item_id"]).returning(
        Embedding.id
    )
    return len(session.execute(statement).all())


def count_embeddings(session: Session, job_id: str) -> int:
    return int(session.scalar(select(func.count()).where(Embedding.job_id == job_id)) or 0)


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def list_embeddings(session: Session, job_id: str) -> Sequence[Embedding]:
    """A job's embeddings in input order."""
    return session.scalars(
        select(Embedding).where(Embedding.job_id == job_id).order_by(Embedding.position)
    ).all()
