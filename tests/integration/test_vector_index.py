"""A collection version's vector index on the real extensions: pgvector (HNSW) on a PostgreSQL
of the session's own, sqlite-vec on SQLite; and a store without either, which searches by an
exact scan. Vectors are written the way the worker writes them (``embeddings.insert_embeddings``,
``upsert_embeddings``) and the index answers what an exact numpy search answers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from storage import backfills, collections, embeddings, jobs, vector_index
from storage.session import scope, sessions_for
from tasks import search
from tests.databases import Databases

DIM = 64
ROWS = 3000


@pytest.fixture(params=["sqlite-vec", "pgvector"])
def indexed_url(
    request: pytest.FixtureRequest, databases: Databases, tmp_path: Path
) -> Iterator[str]:
    """A migrated store with a vector extension, of each kind."""
    if request.param == "sqlite-vec":
        yield databases.sqlite(tmp_path)
    else:
        yield request.getfixturevalue("pgvector_url")


def clustered(count: int, seed: int) -> np.ndarray:
    """Unit vectors around 50 centres: shaped like a corpus's, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, DIM))
    points = centres[rng.integers(0, 50, count)] + 0.35 * rng.normal(size=(count, DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def make_collection(url: str, name: str = "docs") -> str:
    job_id = str(uuid.uuid4())
    with scope(sessions_for(url)) as session:
        backfills.create_version(
            session, name, job_id=job_id, model="m", queue="bulk", source="s", options={}
        )
    return job_id


def rows_of(job_id: str, vectors: np.ndarray, start: int = 0) -> list[tuple[object, ...]]:
    return [
        (job_id, f"d{start + i}", start + i, f"{start + i:064x}", DIM, v.tobytes(), 3, False)
        for i, v in enumerate(vectors)
    ]


def test_the_index_finds_what_an_exact_search_finds_and_follows_deletes_and_drops(
    indexed_url: str,
) -> None:
    job_id = make_collection(indexed_url)
    vectors = clustered(ROWS, seed=1)
    with scope(sessions_for(indexed_url)) as session:
        assert collections.current_version(session, "docs").index_table is not None  # type: ignore[union-attr]
        embeddings.insert_embeddings(session, rows_of(job_id, vectors[:2000]))
    with scope(sessions_for(indexed_url)) as session:  # the upsert's way, as a one-text job's
        rest = rows_of(job_id, vectors[2000:], 2000)
        rows = [dict(zip(embeddings.COLUMNS, row, strict=True)) for row in rest]
        embeddings.upsert_embeddings(session, rows)
        embeddings.upsert_embeddings(session, rows[:5])  # already stored: not indexed twice

    with scope(sessions_for(indexed_url)) as session:  # as a run's seal does
        vector_index.build(session, job_id)
        if session.get_bind().dialect.name == "postgresql":  # HNSW answers, not a scan
            table = vector_index.table_name(job_id)
            literal = "[" + ",".join(["0.1"] * DIM) + "]"
            plan = session.connection().exec_driver_sql(
                f"EXPLAIN SELECT item_id FROM {table}"
                f" ORDER BY embedding <=> '{literal}'::vector LIMIT 10"
            )
            assert f"{table}_hnsw" in " ".join(row[0] for row in plan)

    queries = clustered(50, seed=2)
    found = 0
    for query in queries:
        with scope(sessions_for(indexed_url)) as session:
            hits = vector_index.nearest(session, job_id, query, 10)
        assert hits is not None
        exact = np.argsort(-(vectors @ query))[:10]
        found += len({h.item_id for h in hits} & {f"d{i}" for i in exact})
        best = hits[0]
        assert abs(best.score - float(vectors[int(best.item_id[1:])] @ query)) < 1e-4
    recall = found / (10 * len(queries))
    print(f"recall@10 over {len(queries)} queries, {ROWS} vectors: {recall:.3f}")
    assert recall >= 0.95

    gone = [f"d{i}" for i in range(100)]
    with scope(sessions_for(indexed_url)) as session:
        backfills.forget_items(session, job_id, gone)
    with scope(sessions_for(indexed_url)) as session:
        hits = vector_index.nearest(session, job_id, vectors[0], 10)
    assert hits is not None and "d0" not in {h.item_id for h in hits}

    second = str(uuid.uuid4())
    with scope(sessions_for(indexed_url)) as session:
        backfills.create_version(
            session, "docs", job_id=second, model="m2", queue="bulk", source="s", options={}
        )
        table = vector_index.table_name(job_id)
    with (
        scope(sessions_for(indexed_url)) as session,
        pytest.raises(collections.CollectionError, match="readers"),
    ):
        collections.drop_version(session, "docs", 1)
    with (
        scope(sessions_for(indexed_url)) as session,
        pytest.raises(collections.CollectionError, match="still being built"),
    ):
        collections.use_version(session, "docs", 2)
    with scope(sessions_for(indexed_url)) as session:  # its run ends
        backfills.seal_job(session, "docs", second, 0)
        jobs.add_progress(session, second, done=0, failed=0, error=None)
    with scope(sessions_for(indexed_url)) as session:
        collections.use_version(session, "docs", 2)
    with scope(sessions_for(indexed_url)) as session:
        collections.drop_version(session, "docs", 1)
    with scope(sessions_for(indexed_url)) as session:
        assert [v.version for v in collections.list_versions(session, "docs")] == [2]
        assert embeddings.count_embeddings(session, job_id) == 0
        left = session.connection().execute(
            text(
                "SELECT count(*) FROM sqlite_master WHERE name = :t"
                if session.get_bind().dialect.name == "sqlite"
                else "SELECT count(*) FROM pg_tables WHERE tablename = :t"
            ),
            {"t": table},
        )
        assert left.scalar() == 0


def test_a_store_without_the_extension_is_searched_by_an_exact_scan(postgres_url: str) -> None:
    job_id = make_collection(postgres_url)
    vectors = clustered(500, seed=3)
    with scope(sessions_for(postgres_url)) as session:
        assert collections.current_version(session, "docs").index_table is None  # type: ignore[union-attr]
        embeddings.insert_embeddings(session, rows_of(job_id, vectors))
    query = clustered(1, seed=4)[0]
    hits, indexed = search.nearest(postgres_url, job_id, query, 10)
    assert not indexed
    exact = [f"d{i}" for i in np.argsort(-(vectors @ query))[:10]]
    assert [h.item_id for h in hits] == exact
