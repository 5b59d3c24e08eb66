"""A collection version's vector index: its vectors again, in a table the store searches by
cosine distance, written in the same transaction as the ``embeddings`` rows they copy.

- PostgreSQL + pgvector: ``item_id`` and ``embedding vector(DIM)``, with an HNSW index
  (``vector_cosine_ops``); rows go in by ``COPY .. (FORMAT BINARY)`` in pgvector's own binary
  form, so a batch's index write costs one round trip, as its ``embeddings`` write does. The
  HNSW index is built when the version's first run has written everything (``build``): kept
  row by row from the start, it made each 256-row batch's write 28 times slower; until then,
  pgvector answers a search by an exact scan.
- SQLite + sqlite-vec: a ``vec0`` virtual table (``distance_metric=cosine``), searched by an
  exact scan in C.

A version gets an index when it is made in a store that has the extension (``plan``): its
``index_table`` is named then, and the table is made at the version's first write, when its
dimension is known (``write``), under the version row's lock so two workers never race. A
version made in a store without the extension has none, and is searched by an exact scan of its
``embeddings`` rows (``tasks.search``).

Functions take the session first and never commit.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from storage import vector_extensions
from storage.models import CollectionVersion

IndexRow = tuple[str, str, bytes]
"""A job id, an item id and the item's float32 vector bytes."""
EF_SEARCH_FLOOR = 100
"""HNSW's ``ef_search`` (candidates kept while searching) is at least this, or twice k."""


class VectorIndexError(Exception):
    """Raised when a version's index cannot be written as the version requires (a worker
    whose store connection lacks the extension, a vector of another dimension)."""


@dataclass(frozen=True)
class Hit:
    item_id: str
    score: float
    """Cosine similarity to the query."""


def table_name(job_id: str) -> str:
    return "vectors_" + job_id.replace("-", "")


def plan(session: Session, version: CollectionVersion) -> None:
    """Give ``version`` an index where the store can keep one (PostgreSQL's extension is
    created when the server has it); say once how to enable it where it cannot."""
    if vector_extensions.enable_vectors(session):
        version.index_table = table_name(version.job_id)
    else:
        vector_extensions.say_once(session.get_bind().dialect.name)


_known: OrderedDict[str, bool] = OrderedDict()
"""Whether a job's vectors go to an index, as the worker's claim of its batch read it: a job is
made a version (with or without an index) before any of its batches is sent, and stays so, so
the write of a batch of a job known to have none asks the store nothing (that lookup cost a
one-text job 0.6 ms)."""
KNOWN_JOBS = 4096
_remembering = threading.Lock()


def remember(job_id: str, indexed: bool) -> None:
    """Note whether ``job_id`` keeps an index (the claim read it)."""
    with _remembering:
        _known[job_id] = indexed
        _known.move_to_end(job_id)
        if len(_known) > KNOWN_JOBS:
            _known.popitem(last=False)


def write(session: Session, rows: Sequence[IndexRow]) -> None:
    """Add ``rows`` (just written to ``embeddings``) to the indexes of the versions their jobs
    hold; rows of other jobs are left alone."""
    if not rows:
        return
    jobs = {job_id for job_id, _, _ in rows}
    jobs = {job_id for job_id in jobs if _known.get(job_id, True)}  # indexed, or not known
    if not jobs:
        return
    indexed = session.execute(
        select(
            CollectionVersion.job_id, CollectionVersion.index_table, CollectionVersion.dim
        ).where(CollectionVersion.job_id.in_(jobs), CollectionVersion.index_table.is_not(None))
    ).all()
    for job_id, table, dim in indexed:
        mine = [(item, vector) for job, item, vector in rows if job == job_id]
        width = len(mine[0][1]) // 4
        if dim is None:
            dim = _make_table(session, job_id, str(table), width)
        if dim != width:
            raise VectorIndexError(
                f"the vector index {table} holds {dim}-dimensional vectors, not {width}"
            )
        _insert(session, str(table), dim, mine)


def _make_table(session: Session, job_id: str, table: str, dim: int) -> int:
    """Make the index table of ``job_id``'s version (unless a writer before this one did);
    returns the dimension it holds."""
    connection = session.connection()
    locked = session.execute(
        select(CollectionVersion.dim).where(CollectionVersion.job_id == job_id).with_for_update()
    ).scalar_one()
    if locked is not None:
        return int(locked)
    if not vector_extensions.has_vectors(session):
        raise VectorIndexError(
            f"this process cannot write the vector index {table}: {vector_extensions.HOW_TO_ENABLE}"
        )
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(
            f"CREATE TABLE {table} (item_id varchar(200) PRIMARY KEY,"
            f" embedding vector({dim}) NOT NULL)"
        )
    else:
        connection.exec_driver_sql(
            f"CREATE VIRTUAL TABLE {table} USING vec0(item_id text primary key,"
            f" embedding float[{dim}] distance_metric=cosine)"
        )
    session.execute(
        update(CollectionVersion).where(CollectionVersion.job_id == job_id).values(dim=dim)
    )
    return dim


def _insert(session: Session, table: str, dim: int, rows: Sequence[tuple[str, bytes]]) -> None:
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        driver = connection.connection.driver_connection
        assert driver is not None
        head = struct.pack(">HH", dim, 0)  # pgvector's binary form: dim, unused, big-endian f4
        copy_sql = f"COPY {table} (item_id, embedding) FROM STDIN (FORMAT BINARY)"
        with driver.cursor() as cursor, cursor.copy(copy_sql) as copy:
            copy.set_types(["text", "bytea"])
            for item, vector in rows:
                copy.write_row((item, head + np.frombuffer(vector, "<f4").astype(">f4").tobytes()))
    else:
        connection.exec_driver_sql(
            f"INSERT INTO {table} (item_id, embedding) VALUES (?, ?)",
            [(item, bytes(vector)) for item, vector in rows],
        )


def build(session: Session, job_id: str) -> None:
    """Build the HNSW index of ``job_id``'s version on PostgreSQL, if it has a table and no index
    yet: once its run has written everything (``backfills.seal_job``). Built over the whole
    table at once it costs a fraction of keeping it row by row through the first run's
    writes (``bench/search.py``); after that, a sync's writes keep it."""
    table = _table_of(session, job_id)
    connection = session.connection()
    if table is None or connection.dialect.name != "postgresql":
        return
    connection.exec_driver_sql(
        f"CREATE INDEX IF NOT EXISTS {table}_hnsw ON {table}"
        " USING hnsw (embedding vector_cosine_ops)"
    )


def forget(session: Session, job_id: str, item_ids: Iterable[str]) -> None:
    """Delete ``item_ids`` from the index of ``job_id``'s version, if it has one."""
    table = _table_of(session, job_id)
    ids = list(item_ids)
    if table is None or not ids:
        return
    connection = session.connection()
    mark = "%s" if connection.dialect.name == "postgresql" else "?"
    for start in range(0, len(ids), 500):
        page = ids[start : start + 500]
        connection.exec_driver_sql(
            f"DELETE FROM {table} WHERE item_id IN ({', '.join([mark] * len(page))})",
            tuple(page),
        )


def drop(session: Session, job_id: str) -> None:
    """Drop the index table of ``job_id``'s version, if it has one."""
    table = _table_of(session, job_id)
    if table is not None:
        session.connection().exec_driver_sql(f"DROP TABLE IF EXISTS {table}")


def _table_of(session: Session, job_id: str) -> str | None:
    """The index table of ``job_id``'s version, once made."""
    found = session.execute(
        select(CollectionVersion.index_table, CollectionVersion.dim).where(
            CollectionVersion.job_id == job_id
        )
    ).first()
    if found is None or found.index_table is None or found.dim is None:
        return None
    return str(found.index_table)


def nearest(session: Session, job_id: str, query: np.ndarray, k: int) -> list[Hit] | None:
    """The ``k`` ids of ``job_id``'s version nearest ``query`` by cosine, best first; ``None``
    when the version has no index (or the store cannot read it now)."""
    table = _table_of(session, job_id)
    if table is None or not vector_extensions.has_vectors(session):
        return None
    connection = session.connection()
    vector = np.asarray(query, dtype="<f4")
    if connection.dialect.name == "postgresql":
        literal = "[" + ",".join(repr(float(x)) for x in vector) + "]"
        connection.execute(text(f"SET LOCAL hnsw.ef_search = {max(EF_SEARCH_FLOOR, 2 * k)}"))
        rows = connection.execute(
            text(
                f"SELECT item_id, embedding <=> CAST(:q AS vector) AS distance FROM {table}"
                " ORDER BY embedding <=> CAST(:q AS vector) LIMIT :k"
            ),
            {"q": literal, "k": k},
        ).all()
    else:
        rows = connection.exec_driver_sql(
            f"SELECT item_id, distance FROM {table} WHERE embedding MATCH ? AND k = ?"
            " ORDER BY distance",
            (vector.tobytes(), k),
        ).all()
    return [Hit(str(item), 1.0 - float(distance)) for item, distance in rows]
