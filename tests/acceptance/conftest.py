"""Real processes over real Redis, PostgreSQL or SQLite, and the exported model.

Most acceptance tests share one worker process per dialect for the whole session (``fleet``),
as Celery's own integration tests do: starting a worker (onnxruntime, the model's hash, the
warm-up) costs seconds, and a test that only sends it jobs does not need a new one. Between
tests the fleet's store is emptied (job tables truncated) and its queues cleared; the worker
and its model stay warm. PostgreSQL is the default fleet; a test parametrised with
``fleet=["sqlite", "postgresql"]`` runs on both; ``pgvector`` is a PostgreSQL with pgvector of
the session's own (``tests.databases.PgvectorServer``).

A test that stops, kills or reconfigures its workers starts its own on ``pipeline_env``: a
store of the test's own and a Redis database no session worker listens on.

The brokers are databases of a ``redis-server`` of the session's own, on a free port
(``Brokers``): the PostgreSQL fleet's, the SQLite fleet's, the tests' own workers', and one
nobody consumes. Two test sessions at once (``pytest -n``, or two runs on one machine) never
share a queue.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from storage.session import make_engine
from tasks import names
from tests.conftest import require
from tests.databases import Databases
from tests.processes import KEY, PrivateRedis, Server, Worker
from worker.settings import Settings, get_settings

__all__ = ["KEY", "Brokers", "Fleet", "Server", "Worker"]

USES = ("postgresql", "sqlite", "own", "nobody", "pgvector")
# Emptied between tests, children first (SQLite deletes in this order; PostgreSQL truncates
# them together). The models table keeps what the fleet's worker reported ready at its start.
TABLES = (
    "api_batch_requests",
    "api_batches",
    "api_files",
    "collection_versions",
    "backfills",
    "failed_items",
    "batch_stats",
    "embeddings",
    "batches",
    "jobs",
    "model_sources",
    "leases",
)


class Brokers:
    """The session's Redis server: one database per use (``USES``)."""

    def __init__(self, server: PrivateRedis) -> None:
        self.server = server

    def database(self, use: str) -> str:
        """The Redis URL of the database for ``use``, flushed."""
        url = f"redis://127.0.0.1:{self.server.port}/{USES.index(use)}"
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            client.flushdb()
        finally:
            client.close()
        return url


@pytest.fixture(scope="session")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Brokers]:
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = PrivateRedis(tmp_path_factory.mktemp("brokers"))
    server.start()
    yield Brokers(server)
    server.kill()


def settings_env(database_url: str, broker_url: str, store_root: Path) -> dict[str, str]:
    return {
        "EMBEDQ_BROKER_URL": broker_url,
        "EMBEDQ_DATABASE_URL": database_url,
        "EMBEDQ_MODEL_DIR": str(store_root),
        "EMBEDQ_DEFAULT_MODEL": "minilm",
        "EMBEDQ_PROVIDERS": "CPUExecutionProvider",
        # A batch whose message is lost (a producer or serve killed between its commit and its
        # publish) is re-published by the reconciler within about 20 s, not 5 minutes.
        "EMBEDQ_STUCK_AFTER": "20",
        "EMBEDQ_SWEEP_INTERVAL": "2",
    }


@dataclass
class Fleet:
    """A session's worker process, its store and its broker, and the ``embedq serve`` in front
    of them (started when a test first asks, kept for the session)."""

    dialect: str
    env: dict[str, str]
    worker: Worker
    server: Server | None = None

    def serve(self) -> Server:
        """The session's ``embedq serve`` on this fleet, keyed with ``KEY`` (and an unused
        second key), its settings the fleet's."""
        if self.server is None or not self.server.alive():
            self.server = Server({**self.env, "EMBEDQ_API_KEYS": f"{KEY},sk-unused"})
        return self.server

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
            for attempt in range(3):
                try:
                    self._empty(engine)
                    break
                except OperationalError:
                    # TRUNCATE takes every table's exclusive lock while the session's worker
                    # reads some of them (its sweep, its lease): PostgreSQL may end the
                    # TRUNCATE as a deadlock's victim, rolled back whole; it is done again.
                    if attempt == 2:
                        raise
        finally:
            engine.dispose()
        client = redis.Redis.from_url(self.broker_url, socket_timeout=5)
        try:
            doomed = [key for key in client.scan_iter("embedq:*")]
            doomed += [key for queue in names.Queue for key in names.queue_lists(queue)]
            client.delete(*doomed)
        finally:
            client.close()

    def _empty(self, engine: Engine) -> None:
        with engine.begin() as connection:
            if self.dialect != "sqlite":
                connection.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
            else:
                for table in TABLES:
                    connection.execute(text(f"DELETE FROM {table}"))
            connection.execute(text("DELETE FROM models WHERE state <> 'ready'"))


class Fleets:
    """The session's fleets, one per dialect, each started the first time a test asks."""

    def __init__(
        self,
        databases: Databases,
        brokers: Brokers,
        store_root: Path,
        folder: Path,
    ) -> None:
        self.databases = databases
        self.pgvector: Databases | None = None
        """The databases of the session's PostgreSQL with pgvector, once a test asked for it."""
        self.brokers = brokers
        self.store_root = store_root
        self.folder = folder
        self.made: dict[str, Fleet] = {}

    def get(self, dialect: str) -> Fleet:
        if dialect not in self.made:
            if dialect == "postgresql":
                database = self.databases.postgres()
            elif dialect == "pgvector":
                assert self.pgvector is not None
                database = self.pgvector.postgres()
            else:
                database = self.databases.sqlite(self.folder / dialect)
            env = settings_env(database, self.brokers.database(dialect), self.store_root)
            env["EMBEDQ_FILES_DIR"] = str(self.folder / dialect / "files")  # serve's uploads
            self.made[dialect] = Fleet(dialect, env, Worker(env, "embedq-test"))
        fleet = self.made[dialect]
        if not fleet.worker.alive():
            pytest.fail(f"the {dialect} fleet's worker died:\n{fleet.worker.tail()}")
        return fleet

    def stop(self) -> None:
        for fleet in self.made.values():
            if fleet.server is not None:
                fleet.server.stop()
            fleet.worker.stop()


@pytest.fixture(scope="session")
def fleets(
    databases: Databases,
    brokers: Brokers,
    minilm: Path,
    store_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleets]:
    made = Fleets(databases, brokers, store_root, tmp_path_factory.mktemp("fleets"))
    yield made
    made.stop()


@pytest.fixture(params=["postgresql"])
def fleet(
    request: pytest.FixtureRequest, fleets: Fleets, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Fleet]:
    """The session's worker for this test's dialect, this process's settings pointed at its
    store and broker; emptied after the test."""
    if request.param == "pgvector":  # the server is started for the first test that asks
        fleets.pgvector = request.getfixturevalue("pgvector_databases")
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
    database_url: str,
    brokers: Brokers,
    minilm: Path,
    store_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, str]]:
    """Settings of this test's own (its store, a Redis database no session worker consumes),
    for tests that start, stop or kill their own workers; this process uses them too."""
    env = settings_env(database_url, brokers.database("own"), store_root)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield env
    from tasks import producer

    producer.dispose()


@pytest.fixture
def serve(fleet: Fleet) -> Iterator[Callable[..., Server]]:
    """``embedq serve`` on the fleet's broker and store: the session's, or, with extra settings
    (keyword arguments), one of the test's own, stopped after it."""
    started: list[Server] = []

    def start(**settings: str) -> Server:
        if not settings:
            return fleet.serve()
        env = {**fleet.env, "EMBEDQ_API_KEYS": f"{KEY},sk-unused", **settings}
        started.append(Server(env))
        return started[-1]

    yield start
    for server in started:
        server.stop()
    servers = [*started, *([fleet.server] if fleet.server is not None else [])]
    logs = "".join(line for server in servers for line in server.lines)
    assert KEY not in logs  # a key's value is never logged
