"""Reading a job's stored vectors back in bulk, page by page, for writing them to a file.

Like ``repository``, functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import Embedding

VectorRow = tuple[str, int, bytes]
"""An item id, the vector's dimension and its float32 bytes."""


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
