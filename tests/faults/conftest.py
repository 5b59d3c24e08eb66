"""Fixtures of the fault tests: real worker processes, a private Redis per test, a proxy in front
of PostgreSQL, and a report line per scenario (a test property, shown in the terminal summary by
``tests/conftest.py``, so CI logs carry the table whether or not pytest runs with ``-s`` or in
parallel).

Workers get short timings so a lost batch comes back in seconds, not minutes, and jobs are
1,000 corpus texts of 40-160 characters in batches of 50: a batch takes about a second on a
small CI machine, so a fault always lands mid-job and the folder stays within minutes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import SCENARIO, require
from tests.faults.outcomes import Outcome, measure
from tests.faults.services import TcpProxy
from tests.processes import PrivateRedis, Worker, celery_worker
from worker.settings import get_settings

# Timings the worker runs under in every scenario (a scenario may override some): a batch
# without progress for 5 s is overdue, the reconciler sweeps every second, an unacknowledged
# message comes back after 10 s, and a retry waits at most 4 s. The hard time limit is only a
# backstop: on a loaded two-core machine a tight one fails healthy batches (soft time limit).
FAST = {
    "EMBEDQ_STUCK_AFTER": "5",
    "EMBEDQ_SWEEP_INTERVAL": "1",
    "EMBEDQ_VISIBILITY_TIMEOUT": "10",
    "EMBEDQ_UNACKED_RESTORE_INTERVAL": "1",
    "EMBEDQ_TASK_TIME_LIMIT": "30",
    "EMBEDQ_RETRY_BACKOFF_MAX": "4",
}
BATCH_SIZE = 50


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A Redis of this test's own, which it may kill and restart empty."""
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def producer_env(
    database_url: str,
    broker: PrivateRedis,
    store_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, str]]:
    """This test's producer settings: the private Redis, the store read directly."""
    env = {
        "EMBEDQ_BROKER_URL": broker.url,
        "EMBEDQ_DATABASE_URL": database_url,
        "EMBEDQ_MODEL_DIR": str(store_root),
        "EMBEDQ_DEFAULT_MODEL": "minilm",
        "EMBEDQ_PROVIDERS": "CPUExecutionProvider",
        "EMBEDQ_JOB_BATCH_SIZE": str(BATCH_SIZE),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield env
    from tasks import producer

    producer.dispose()


@pytest.fixture
def fault_env(producer_env: dict[str, str], minilm: Path) -> dict[str, str]:
    """The producer's settings with the reference model exported for the workers."""
    return producer_env


@pytest.fixture
def start_worker(fault_env: dict[str, str]) -> Iterator[Callable[..., Worker]]:
    """Start a real worker of ``processes`` pool processes on this test's settings and the fast
    timings, with ``overrides`` (``EMBEDQ_*`` names); every worker started is stopped at the
    end of the test."""
    started: list[Worker] = []

    def start(name: str, processes: int = 1, pool: str = "prefork", **overrides: str) -> Worker:
        env = {**fault_env, **FAST, "EMBEDQ_PROCESSES": str(processes), **overrides}
        command = celery_worker(name, processes=processes, pool=pool)
        started.append(Worker(env, name, command))
        return started[-1]

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def pg_proxy(database_url: str) -> Iterator[TcpProxy]:
    """A proxy in front of the test's PostgreSQL, listening."""
    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.start()
    yield proxy
    proxy.close()


@pytest.fixture
def report(request: pytest.FixtureRequest, database_url: str) -> Callable[..., Outcome]:
    """Measure what a job left in the store, print it and add it to the summary table."""

    def record(job_id: str, submitted: int, seconds: float, note: str = "") -> Outcome:
        outcome = measure(request.node.name, database_url, job_id, submitted, seconds, note)
        print(outcome.line())
        request.node.user_properties.append((SCENARIO, outcome.line()))
        return outcome

    return record
