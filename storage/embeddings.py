"""Embeddings: one row per (job, item), written in bulk, read back in input order.

A batch's rows are written the fastest way each store has (``insert_embeddings``): PostgreSQL
``COPY ... FROM STDIN (FORMAT BINARY)``, SQLite one prepared ``executemany``. Neither skips a
row already there: the caller makes sure none is (``storage.batch_results`` ends the batch in
the ledger first, so only one delivery of a batch ever writes its rows) and falls back to the
upsert (``upsert_embeddings``), which skips the (job, item) pairs already stored, when the
bulk write meets one anyway.

Both also add the rows to their collection version's vector index, when it has one
(``storage.vector_index``), in the same transaction.

The table is also the content cache: ``cached_vectors`` finds a text's stored vector under a
model by the text's sha256 (indexed), so a backfill that meets a text again copies it.

Functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Row, bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage import dialect, model_files, vector_index
from storage.models import Embedding, Job

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
        _table.c.job_id, _table.c.item_id
    )


def upsert_embeddings(session: Session, rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Insert embedding rows, skipping (job, item) pairs already stored; returns the (job id,
    item id) of the rows inserted."""
    if not rows:
        return []
    statement = dialect.prepared(session, "embeddings", _upsert)
    inserted = session.connection().execute(statement, list(rows))
    new = [(str(row[0]), str(row[1])) for row in inserted]
    added = set(new)
    vector_index.write(
        session,
        [
            (row["job_id"], row["item_id"], row["vector"])
            for row in rows
            if (row["job_id"], row["item_id"]) in added
        ],
    )
    return new


COLUMNS = (
    "job_id",
    "item_id",
    "position",
    "text_sha256",
    "dim",
    "vector",
    "token_count",
    "truncated",
)
"""An embedding row's columns, in the order ``insert_embeddings`` writes them."""
_NAMES = ", ".join(COLUMNS)
_COPY = f"COPY {Embedding.__tablename__} ({_NAMES}) FROM STDIN (FORMAT BINARY)"
_COPY_TYPES = ("text", "text", "int4", "text", "int4", "bytea", "int4", "bool")
_INSERT = f"INSERT INTO {Embedding.__tablename__} ({_NAMES}) VALUES ({', '.join('?' * 8)})"


def insert_embeddings(session: Session, rows: Sequence[Sequence[Any]]) -> int:
    """Write embedding rows (tuples in ``COLUMNS`` order) in bulk; returns how many. A (job,
    item) pair already stored raises ``IntegrityError`` (see the module)."""
    if not rows:
        return 0
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        from psycopg.errors import UniqueViolation

        driver = connection.connection.driver_connection  # psycopg 3, in the session's transaction
        assert driver is not None
        try:
            with driver.cursor() as cursor, cursor.copy(_COPY) as copy:
                copy.set_types(list(_COPY_TYPES))
                for row in rows:
                    copy.write_row(row)
        except UniqueViolation as exc:  # raised by the driver, past SQLAlchemy: say it as it would
            raise IntegrityError(_COPY, None, exc) from exc
    else:
        connection.exec_driver_sql(_INSERT, list(rows))
    vector_index.write(session, [(row[0], row[1], row[5]) for row in rows])
    return len(rows)


def cached_vectors(
    session: Session, model_sha256: str, hashes: Sequence[str]
) -> dict[str, Embedding]:
    """A stored embedding of each of these texts made by the model file ``model_sha256`` (the
    first stored), by text sha256: what a backfill copies instead of running the model again.
    Only jobs that one file embedded are sources: a model pulled again under its name from
    another file never reuses the old file's vectors, and a job some other file also embedded
    batches of (``model_files.OTHER_FILES``) is never a source."""
    if not hashes:
        return {}
    first = (
        select(func.min(Embedding.id))
        .join(Job, Job.id == Embedding.job_id)
        .where(Job.model_sha256 == model_sha256, Embedding.text_sha256.in_(set(hashes)))
        .group_by(Embedding.text_sha256)
    )
    found = session.scalars(select(Embedding).where(Embedding.id.in_(first))).all()
    sources = {embedding.job_id for embedding in found}
    mixed = {
        job.id
        for job in session.scalars(select(Job).where(Job.id.in_(sources)))
        if len(model_files.model_files(job)) > 1
    }
    return {e.text_sha256: e for e in found if e.job_id not in mixed}


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
