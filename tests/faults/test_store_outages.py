"""The job store goes away mid-job and comes back: the pipeline retries, loses nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.conftest import Worker
from tests.faults.outcomes import (
    JOB_SIZE,
    Outcome,
    finished,
    job_texts,
    tail,
    wait_done,
    wait_terminal,
)
from tests.faults.services import SqliteLocker, TcpProxy, through

pytestmark = [pytest.mark.faults, pytest.mark.model]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgresql_refused_for_15_s_mid_job_loses_nothing(
    start_worker: Callable[..., Worker],
    pg_proxy: TcpProxy,
    short_texts: list[str],
    database_url: str,
    report: Callable[..., Outcome],
) -> None:
    from tasks import producer

    # The worker reaches PostgreSQL through the proxy; this test reads it directly.
    worker = start_worker("pg-outage", EMBEDQ_DATABASE_URL=through(pg_proxy, database_url))
    texts = job_texts(short_texts, 0)
    started = time.monotonic()
    job = producer.submit(texts)
    wait_done(job, 200, worker)

    pg_proxy.stop()  # refused, and every open connection cut
    at = job.status()["done"]
    time.sleep(15)
    assert not finished(job.status()), "the job finished while the database was unreachable"
    pg_proxy.start()

    status = wait_terminal(job, 180)
    note = f"PostgreSQL unreachable for 15 s from {at} items stored"
    outcome = report(job.id, len(texts), time.monotonic() - started, note=note)
    assert outcome.verdict == ("succeeded", JOB_SIZE, 0, 0), (status, tail(worker))
    assert worker.process.poll() is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_locked_for_40_s_by_another_process_mid_job_loses_nothing(
    start_worker: Callable[..., Worker],
    short_texts: list[str],
    database_url: str,
    report: Callable[..., Outcome],
) -> None:
    from tasks import producer

    # A batch may wait out the 30 s busy timeout inside one run: a hard time limit and a
    # visibility timeout above that, so the fault seen is the lock, not a killed batch.
    worker = start_worker(
        "sqlite-lock", EMBEDQ_TASK_TIME_LIMIT="90", EMBEDQ_VISIBILITY_TIMEOUT="200"
    )
    texts = job_texts(short_texts, 1)
    started = time.monotonic()
    job = producer.submit(texts)
    wait_done(job, 200, worker)

    locker = SqliteLocker(Path(database_url.removeprefix("sqlite:///")))
    try:
        locker.hold(40)
        at = job.status()["done"]
        time.sleep(35)
        assert job.status()["done"] == at, "a batch was stored while the store was locked"
        locker.wait()
    finally:
        locker.release()

    status = wait_terminal(job, 240)
    note = f"SQLite write-locked for 40 s from {at} items stored"
    outcome = report(job.id, len(texts), time.monotonic() - started, note=note)
    assert outcome.verdict == ("succeeded", JOB_SIZE, 0, 0), (status, tail(worker))
    assert worker.process.poll() is None
