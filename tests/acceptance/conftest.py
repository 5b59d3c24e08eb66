"""Real processes over real Redis, PostgreSQL or SQLite, and the exported model.

Most acceptance tests share one worker process per dialect for the whole session (``fleet``),
as Celery's own integration tests do: starting a worker (onnxruntime, the model's hash, the
warm-up) costs seconds, and a test that only sends it jobs does not need a new one. Between
tests the fleet's store is emptied (job tables truncated) and its queues cleared; the worker
and its model stay warm. PostgreSQL is the default fleet; a test parametrised with
``fleet=["sqlite", "postgresql"]`` runs on both.

A test that stops, kills or reconfigures its workers starts its own on ``pipeline_env``: a
store of the test's own and a Redis database no session worker listens on.

Redis databases, the four after ``EMBEDQ_TEST_REDIS``'s (default ``redis://127.0.0.1:6379/11``,
the integration tests'): the PostgreSQL fleet's, the SQLite fleet's, the tests' own workers',
and one nobody consumes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from storage.session import make_engine
from tests.conftest import require
from tests.databases import Databases
from tests.processes import KEY, Server, Worker
from worker.settings import Settings, get_settings

__all__ = ["KEY", "REDIS", "Fleet", "Server", "Worker", "redis_database"]

REDIS = os.environ.get("EMBEDQ_TEST_REDIS", "redis://127.0.0.1:6379/11")
OFFSETS = {"postgresql": 1, "sqlite": 2, "own": 3, "nobody": 4}
"""Redis databases after ``EMBEDQ_TEST_REDIS``'s own (the integration tests')."""
# Emptied between tests, children first (SQLite deletes in this order; PostgreSQL truncates
# them together). The models table keeps what the fleet's worker reported ready at its start.
TABLES = (
    "api_batch_requests",
    "api_batches",
    "api_files",
    "vector_cache",
    "backfills",
    "failed_items",
    "batch_stats",
    "embeddings",
    "batches",
    "jobs",
    "model_sources",
    "leases",
)


def redis_database(use: str) -> str:
    """The Redis URL of one of the tests' databases (``OFFSETS``), flushed."""
    base, _, index = REDIS.rpartition("/")
    url = f"{base}/{int(index or 0) + OFFSETS[use]}"
    try:
        client = redis.Redis.from_url(url, socket_timeout=5)
        client.flushdb()
        client.close()
    except redis.RedisError as exc:
        require(False, f"Redis is not reachable at {url}: {exc}")
    return url


def settings_env(database_url: str, broker_url: str, store_root: Path) -> dict[str, str]:
    return {
        "EMBEDQ_BROKER_URL": broker_url,
        "EMBEDQ_DATABASE_URL": database_url,
        "EMBEDQ_MODEL_DIR": str(store_root),
        "EMBEDQ_DEFAULT_MODEL": "minilm",
        "EMBEDQ_PROVIDERS": "CPUExecutionProvider",
    }


@dataclass
class Fleet:
    """A session's worker process, its store and its broker."""

    dialect: str
    env: dict[str, str]
    worker: Worker

    @property
    def database_url(self) -> str:
        return self.env["EMBEDQ_DATABASE_URL"]

    @property
    def broker_url(self) -> str:
        return self.env["EMBEDQ_BROKER_URL"]

    def settings(self) -> Settings:
        return Settings(
            database_url=self.database_url,
            broker_url=self.broker_url,
            model_dir=Path(self.env["EMBEDQ_MODEL_DIR"]),
            default_model="minilm",
            providers=["CPUExecutionProvider"],
        )

    def clean(self) -> None:
        """Empty the store's job tables and the broker's queues; the worker stays up."""
        engine = make_engine(self.database_url)
        try:
            with engine.begin() as connection:
                if self.dialect == "postgresql":
                    connection.execute(
                        text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
                    )
                else:
                    for table in TABLES:
                        connection.execute(text(f"DELETE FROM {table}"))
                connection.execute(text("DELETE FROM models WHERE state <> 'ready'"))
        finally:
            engine.dispose()
        client = redis.Redis.from_url(self.broker_url, socket_timeout=5)
        try:
            doomed = [key for key in client.scan_iter("embedq:*")]
            doomed += [f"{q}{suffix}" for q in ("interactive", "bulk") for suffix in _LISTS]
            client.delete(*doomed)
        finally:
            client.close()


_LISTS = ("", "\x06\x163", "\x06\x166", "\x06\x169")
"""A kombu queue's list and its priority sub-lists."""


class Fleets:
    """The session's fleets, one per dialect, each started the first time a test asks."""

    def __init__(self, databases: Databases, store_root: Path, folder: Path) -> None:
        self.databases = databases
        self.store_root = store_root
        self.folder = folder
        self.made: dict[str, Fleet] = {}

    def get(self, dialect: str) -> Fleet:
        if dialect not in self.made:
            if dialect == "postgresql":
                database = self.databases.postgres()
            else:
                database = self.databases.sqlite(self.folder / dialect)
            env = settings_env(database, redis_database(dialect), self.store_root)
            self.made[dialect] = Fleet(dialect, env, Worker(env, "embedq-test"))
        fleet = self.made[dialect]
        if not fleet.worker.alive():
            pytest.fail(f"the {dialect} fleet's worker died:\n{fleet.worker.tail()}")
        return fleet

    def stop(self) -> None:
        for fleet in self.made.values():
            fleet.worker.stop()


@pytest.fixture(scope="session")
def fleets(
    databases: Databases,
    minilm: Path,
    store_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleets]:
    made = Fleets(databases, store_root, tmp_path_factory.mktemp("fleets"))
    yield made
    made.stop()


@pytest.fixture(params=["postgresql"])
def fleet(
    request: pytest.FixtureRequest, fleets: Fleets, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Fleet]:
    """The session's worker for this test's dialect, this process's settings pointed at its
    store and broker; emptied after the test."""
    running = fleets.get(request.param)
    for key, value in running.env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield running
    from tasks import producer

    producer.dispose()
    running.clean()


@pytest.fixture
def pipeline_env(
    database_url: str, minilm: Path, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """Settings of this test's own (its store, a Redis database no session worker consumes),
    for tests that start, stop or kill their own workers; this process uses them too."""
    env = settings_env(database_url, redis_database("own"), store_root)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield env
    from tasks import producer

    producer.dispose()
