"""The job store goes away mid-job and comes back: the pipeline retries, loses nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

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
from tests.processes import Worker

OUTAGE_S = 8
"""How long the store stays away: several tries of a batch (backoff capped at 4 s here)."""


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgresql_refused_for_8_s_mid_job_loses_nothing(
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
    time.sleep(OUTAGE_S)  # the outage itself
    assert not finished(job.status()), "the job finished while the database was unreachable"
    pg_proxy.start()

    status = wait_terminal(job, 180)
    note = f"PostgreSQL unreachable for {OUTAGE_S} s from {at} items stored"
    outcome = report(job.id, len(texts), time.monotonic() - started, note=note)
    assert outcome.verdict == ("succeeded", JOB_SIZE, 0, 0), (status, tail(worker))
    assert worker.process.poll() is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_locked_past_the_busy_timeout_by_another_process_mid_job_loses_nothing(
    start_worker: Callable[..., Worker],
    short_texts: list[str],
    database_url: str,
    report: Callable[..., Outcome],
) -> None:
    from tasks import producer

    # The worker's busy timeout is 2 s (the URL's ``timeout``, 30 s by default): the lock
    # outlasts it several times, so writes fail with "database is locked" and are retried.
    worker = start_worker("sqlite-lock", EMBEDQ_DATABASE_URL=f"{database_url}?timeout=2")
    texts = job_texts(short_texts, 1)
    started = time.monotonic()
    job = producer.submit(texts)
    wait_done(job, 200, worker)

    locker = SqliteLocker(Path(database_url.removeprefix("sqlite:///")))
    try:
        locker.hold(OUTAGE_S)
        at = job.status()["done"]
        time.sleep(OUTAGE_S - 2)  # the lock itself
        assert job.status()["done"] == at, "a batch was stored while the store was locked"
        locker.wait()
    finally:
        locker.release()

    status = wait_terminal(job, 240)
    note = f"SQLite write-locked for {OUTAGE_S} s (busy timeout 2 s) from {at} items stored"
    outcome = report(job.id, len(texts), time.monotonic() - started, note=note)
    assert outcome.verdict == ("succeeded", JOB_SIZE, 0, 0), (status, tail(worker))
    assert worker.process.poll() is None
