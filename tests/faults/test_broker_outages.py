"""The broker goes away: restarted empty mid-job, or down when a job is submitted."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from sqlalchemy import text

from storage.session import make_engine
from tests.faults.outcomes import (
    JOB_SIZE,
    Outcome,
    job_texts,
    scalar,
    tail,
    wait_done,
    wait_terminal,
)
from tests.processes import PrivateRedis, Worker
from tests.waiting import wait_until
from worker.errors import UnavailableError


@pytest.mark.model
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_redis_restarted_empty_mid_job_is_recovered_by_the_reconciler(
    start_worker: Callable[..., Worker],
    broker: PrivateRedis,
    short_texts: list[str],
    database_url: str,
    report: Callable[..., Outcome],
) -> None:
    from tasks import producer

    worker = start_worker("redis-restart")
    texts = job_texts(short_texts, 2)
    started = time.monotonic()
    job = producer.submit(texts)
    wait_done(job, 200, worker)

    broker.restart()  # every queued and unacknowledged batch is gone; nobody re-submits

    status = wait_terminal(job, 180)
    # The ledger shows the recovery: lost batches were published again.
    again = scalar(
        database_url, "SELECT count(*) FROM batches WHERE job_id = :j AND sends > 1", j=job.id
    )
    elapsed = time.monotonic() - started
    outcome = report(job.id, len(texts), elapsed, note=f"{again} batches re-published")
    assert outcome.verdict == ("succeeded", JOB_SIZE, 0, 0), (status, tail(worker))
    assert again >= 1
    assert worker.process.poll() is None


@pytest.mark.model
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_redis_at_maxmemory_stops_no_worker_and_loses_no_batch(
    start_worker: Callable[..., Worker],
    broker: PrivateRedis,
    short_texts: list[str],
    database_url: str,
    report: Callable[..., Outcome],
) -> None:
    """Redis refuses every write (maxmemory reached, noeviction): a worker that pops a batch
    cannot record it as unacknowledged, and the batch is gone from Redis. The worker used to
    exit ("Unrecoverable error: OutOfMemoryError"); it now reconnects until Redis takes writes
    again, and the reconciler re-sends the lost batch from the ledger."""
    from tasks import producer

    worker = start_worker("redis-oom")
    texts = job_texts(short_texts, 12)
    started = time.monotonic()
    job = producer.submit(texts)
    wait_done(job, 200, worker)

    redis = broker.client()
    redis.config_set("maxmemory-policy", "noeviction")
    redis.config_set("maxmemory", "1")  # far below what it holds: every write is refused
    seen = len(worker.lines)
    wait_until(
        lambda: worker.logged("used memory > 'maxmemory'", since=seen) or not worker.alive(),
        120,
        "the worker to meet Redis's out-of-memory refusal",
        detail=worker.tail,
    )
    # Held while the worker tries again and again: it stays up through every refusal.
    wait_until(
        lambda: sum("Trying to reconnect" in line for line in worker.lines[seen:]) >= 3,
        60,
        "the worker to try Redis three times",
        detail=worker.tail,
    )
    assert worker.alive(), tail(worker)
    redis.config_set("maxmemory", "0")  # memory freed: Redis takes writes again

    status = wait_terminal(job, 240)
    again = scalar(
        database_url, "SELECT count(*) FROM batches WHERE job_id = :j AND sends > 1", j=job.id
    )
    elapsed = time.monotonic() - started
    outcome = report(job.id, len(texts), elapsed, note=f"{again} batches re-published")
    assert outcome.verdict == ("succeeded", JOB_SIZE, 0, 0), (status, tail(worker))
    assert worker.alive(), tail(worker)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_submit_with_the_broker_down_fails_fast_and_leaves_no_job_queued(
    producer_env: dict[str, str],
    broker: PrivateRedis,
    database_url: str,
    report: Callable[..., Outcome],
) -> None:
    from tasks import producer

    broker.kill()
    texts = ["the broker is down", "so this job cannot be queued"]
    started = time.monotonic()
    with pytest.raises(UnavailableError) as raised:
        producer.submit(texts)
    elapsed = time.monotonic() - started

    message = str(raised.value)
    assert elapsed < 10, f"submit took {elapsed:.1f}s to give up"
    assert "Traceback" not in message and (
        str(broker.port) in message or "broker" in message.lower()
    ), message
    database = make_engine(database_url)
    with database.connect() as connection:
        jobs = connection.execute(text("SELECT id, state, error FROM jobs")).all()
    database.dispose()
    assert len(jobs) == 1, jobs
    job_id, state, error = jobs[0]
    report(job_id, len(texts), elapsed, note=f"UnavailableError: {message[:120]}")
    assert state == "failed" and error, jobs
    assert str(broker.port) in error or "broker" in error.lower(), error
