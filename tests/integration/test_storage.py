"""The SQL store on real SQLite and PostgreSQL: migrations equal the models; upserts dedupe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from storage import embeddings, jobs, model_files, schema
from storage.models import Base, Job
from storage.session import make_engine, scope, session_factory
from tests.cli import Cli


def test_migrations_create_exactly_the_models_schema(empty_database_url: str) -> None:
    database_url = empty_database_url
    schema.upgrade(database_url)
    engine = make_engine(database_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    assert set(inspect(engine).get_table_names()) >= {"jobs", "embeddings", "batch_stats", "models"}
    engine.dispose()

    schema.downgrade(database_url, "base")
    engine = make_engine(database_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()


def test_a_redelivered_batch_writes_each_item_once(database_url: str) -> None:
    engine = make_engine(database_url)
    factory = session_factory(engine)
    vectors = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    rows = [
        {
            "job_id": "job-1",
            "item_id": f"item-{i}",
            "position": i,
            "text_sha256": "0" * 64,
            "dim": 4,
            "vector": vectors[i].tobytes(),
            "token_count": 5,
            "truncated": False,
        }
        for i in (2, 0, 1)
    ]
    with scope(factory) as session:
        session.add(Job(id="job-1", model_name="minilm", queue="interactive", total_items=3))
    with scope(factory) as session:
        assert len(embeddings.upsert_embeddings(session, rows)) == 3
    with scope(factory) as session:  # the same batch again, as after a lost worker
        assert embeddings.upsert_embeddings(session, rows) == []
        assert embeddings.count_embeddings(session, "job-1") == 3
        stored = embeddings.list_embeddings(session, "job-1")
        assert [e.item_id for e in stored] == ["item-0", "item-1", "item-2"]
        np.testing.assert_array_equal(
            np.stack([np.frombuffer(e.vector, dtype=np.float32) for e in stored]), vectors
        )
    engine.dispose()


def test_a_job_records_its_first_model_file_and_any_other_once(database_url: str) -> None:
    engine = make_engine(database_url)
    factory = session_factory(engine)
    first, other = "a" * 64, "b" * 64
    with scope(factory) as session:
        session.add(Job(id="job-1", model_name="minilm", queue="bulk", meta={"backfill": "x"}))
    recorded = []
    for sha in (first, first, other, other, first):  # batches of a fleet with mixed files
        with scope(factory) as session:
            recorded.append(model_files.record_model_file(session, "job-1", sha))
    assert recorded == [None, None, first, first, None]
    with scope(factory) as session:
        job = jobs.get_job(session, "job-1")
        assert job is not None and job.model_sha256 == first
        assert job.meta == {"backfill": "x", model_files.OTHER_FILES: [other]}
        assert model_files.model_files(job) == [first, other]
        assert model_files.files_of_jobs(session, ["job-1", "no-such-job"]) == {first}
        assert model_files.record_model_file(session, "no-such-job", first) is None
    engine.dispose()


def test_embedq_db_upgrade_creates_the_schema(cli: Cli, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'embedq.db'}"
    result = cli("db", "upgrade", env={"EMBEDQ_DATABASE_URL": url})
    assert result.code == 0, result.shown()
    assert result.stdout == f"schema at head in {url}\n"
    engine = make_engine(url)
    assert "jobs" in inspect(engine).get_table_names()
    engine.dispose()
