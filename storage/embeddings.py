"""Embeddings: one row per (job, item), written by upsert, read back in input order.

Functions take the session first and never commit. A redelivered batch's rows are skipped by
the (job, item) upsert, so at-least-once delivery never stores an item twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Row, bindparam, func, select
from sqlalchemy.orm import Session

from storage import dialect
from storage.models import Embedding

VectorRow = tuple[str, int, bytes]
"""An item id, the vector's dimension and its float32 bytes."""

_table: Any = Embedding.__table__
_VECTORS = (  # a client's read back, in Core: no ORM objects for a job's worth of rows
    select(_table.c.item_id, _table.c.vector)
    .where(_table.c.job_id == bindparam("job"))
    .order_by(_table.c.position)
)


def _upsert(session: Session) -> Any:
    insert: Any = dialect.upsert(session, _table)
    # RETURNING yields only the rows this statement inserted (PostgreSQL; SQLite >= 3.35).
    return insert.on_conflict_do_nothing(index_elements=["job_id", "item_id"]).returning(
        _table.c.id, _table.c.text_sha256
    )


def upsert_embeddings(session: Session, rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
    """Insert embedding rows, skipping (job, item) pairs already stored; returns the (id, text
    sha256) of the rows inserted."""
    if not rows:
        return []
    statement = dialect.prepared(session, "embeddings", _upsert)
    return [(row[0], row[1]) for row in session.connection().execute(statement, list(rows))]


def count_embeddings(session: Session, job_id: str) -> int:
    return int(session.scalar(select(func.count()).where(Embedding.job_id == job_id)) or 0)


def list_embeddings(session: Session, job_id: str) -> Sequence[Embedding]:
    """A job's embeddings in input order."""
    return session.scalars(
        select(Embedding).where(Embedding.job_id == job_id).order_by(Embedding.position)
    ).all()


def list_vectors(session: Session, job_id: str) -> Sequence[Row[Any]]:
    """A job's (item_id, vector bytes) in input order (no ORM objects)."""
    return session.connection().execute(_VECTORS, {"job": job_id}).all()


def vectors_with_tokens(session: Session, job_id: str) -> Sequence[Row[str, bytes, int]]:
    """A job's (item_id, vector bytes, token_count) in input order: the API answers vectors
    with the tokens really counted for them."""
    return session.execute(
        select(Embedding.item_id, Embedding.vector, Embedding.token_count)
        .where(Embedding.job_id == job_id)
        .order_by(Embedding.position)
    ).all()


def count_vectors(session: Session, job_id: str) -> tuple[int, int | None]:
    """How many vectors ``job_id`` holds, and their (largest) dimension."""
    count, dim = session.execute(
        select(func.count(), func.max(Embedding.dim)).where(Embedding.job_id == job_id)
    ).one()
    return int(count), None if dim is None else int(dim)


def stream_vectors(session: Session, job_id: str, page: int) -> Iterator[list[VectorRow]]:
    """The vectors of ``job_id`` in input order, ``page`` rows at a time, read from the
    database as they are consumed."""
    rows = session.execute(
        select(Embedding.item_id, Embedding.dim, Embedding.vector)
        .where(Embedding.job_id == job_id)
        .order_by(Embedding.position)
        .execution_options(yield_per=page)
    )
    for chunk in rows.partitions(page):
        yield [(item_id, dim, vector) for item_id, dim, vector in chunk]
