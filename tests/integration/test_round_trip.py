"""What the one-text round trip relies on: the producer's batched send over real Redis (and its
second try when the first fails), the final status a completion signal carries to ``wait``,
PostgreSQL connections pinged only after sitting idle, and commits that skip the WAL flush
only in the transaction that asks."""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text

from storage import schema, session
from storage.models import Job, JobState
from storage.session import commit_without_flush, scope, sessions_for
from tasks import completion, names, producer
from tasks.batches import embed_batch
from tests.conftest import require
from tests.fakes import FakeEngine
from worker.errors import UnavailableError

REDIS = os.environ.get("EMBEDQ_TEST_REDIS", "redis://127.0.0.1:6379/11")


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[redis.Redis]:
    try:
        client = redis.Redis.from_url(REDIS, socket_timeout=5)
        client.flushdb()
    except redis.RedisError as exc:
        require(False, f"Redis is not reachable at {REDIS}: {exc}")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    schema.upgrade(url)
    monkeypatch.setenv("EMBEDQ_BROKER_URL", REDIS)
    monkeypatch.setenv("EMBEDQ_DATABASE_URL", url)
    monkeypatch.setenv("EMBEDQ_JOB_BATCH_SIZE", "2")
    yield client
    producer.dispose()
    client.flushdb()
    client.close()


def _queued(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def test_a_job_s_batches_reach_the_queue_with_their_task_ids_in_one_send(
    broker: redis.Redis,
) -> None:
    job = producer.submit(["a", "bb", "ccc", "dddd", "eeeee"], model="m")
    messages = _queued(broker, str(names.Queue.INTERACTIVE))
    ids = sorted(message["headers"]["id"] for message in messages)
    assert ids == [f"{job.id}.0", f"{job.id}.1", f"{job.id}.2"]
    assert all(message["headers"]["task"] == names.EMBED for message in messages)


def test_a_failed_batched_send_is_tried_once_more_message_by_message(
    broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    tries: list[bool] = []
    send = producer._send

    def flaky(messages: Any, queue: Any, url: str, batched: bool) -> None:
        tries.append(batched)
        if batched:
            raise redis.ConnectionError("the broker restarted")
        send(messages, queue, url, batched)

    monkeypatch.setattr(producer, "_send", flaky)
    job = producer.submit(["a", "bb", "ccc"], model="m")
    assert tries == [True, False]
    assert len(_queued(broker, str(names.Queue.INTERACTIVE))) == 2
    assert job.status()["state"] == JobState.QUEUED


def test_a_send_that_fails_twice_fails_the_job_as_unavailable(
    broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*_: Any, **__: Any) -> None:
        raise redis.ConnectionError("connection refused")

    monkeypatch.setattr(producer, "_send", down)
    with pytest.raises(UnavailableError, match="cannot be reached"):
        producer.submit(["a", "bb", "ccc"], model="m")
    with scope(sessions_for(os.environ["EMBEDQ_DATABASE_URL"])) as store:
        (job,) = store.query(Job).all()
        assert (job.state, job.failed_items) == (JobState.FAILED, 3)


def _finished_job(monkeypatch: pytest.MonkeyPatch) -> tuple[producer.JobHandle, Any]:
    """A one-text job submitted and embedded here; the batch's outcome."""
    sent: list[Any] = []
    monkeypatch.setattr(producer, "publish", lambda messages, queue: sent.extend(messages))
    job = producer.submit(["one text"], model="fake")
    with scope(sessions_for(job.database_url)) as store:
        outcome = embed_batch(store, FakeEngine(), sent[0], provider="FakeProvider")
    return job, outcome


def test_the_finishing_batch_hands_its_signal_the_status_wait_returns(
    broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, outcome = _finished_job(monkeypatch)
    assert outcome.finished and outcome.status == job.status()
    assert outcome.status["state"] == "succeeded" and "status" not in outcome.summary()
    completion.signal(REDIS, job.id, outcome.status)

    def no_reads(_: Any) -> dict[str, Any]:
        raise AssertionError("wait read the store")

    monkeypatch.setattr(producer.JobHandle, "status", no_reads)
    assert job.wait(timeout=10) == outcome.status


def test_a_signal_without_a_status_sends_wait_to_the_store(
    broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, outcome = _finished_job(monkeypatch)
    completion.signal(REDIS, job.id)  # as the worker's parent signals a lost batch's end
    started = time.monotonic()
    assert job.wait(timeout=10) == outcome.status
    assert time.monotonic() - started < 0.4  # woken by the signal, not after a poll


def test_a_just_submitted_job_waited_on_with_no_time_left_is_still_looked_up(
    broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, outcome = _finished_job(monkeypatch)  # done, but never signalled
    assert job.wait(timeout=0) == outcome.status
    queued = producer.submit(["another"], model="fake")
    with pytest.raises(producer.JobTimeoutError):
        queued.wait(timeout=0)


def _postgresql(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")


def test_a_connection_used_a_moment_ago_is_not_pinged_and_an_idle_one_is(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _postgresql(database_url)
    factory = sessions_for(database_url)
    pings: list[float] = []
    dialect: Any = factory.kw["bind"].dialect
    ping = dialect.do_ping
    monkeypatch.setattr(dialect, "do_ping", lambda c: pings.append(time.monotonic()) or ping(c))
    for _ in range(3):
        with scope(factory) as store:
            store.execute(text("select 1"))
    assert len(pings) == 1  # the new connection's first checkout only
    monkeypatch.setattr(session, "PING_AFTER_IDLE_S", 0.0)
    with scope(factory) as store:
        store.execute(text("select 1"))
    assert len(pings) == 2
    session.dispose_all()


def test_a_connection_that_died_while_idle_is_replaced_at_checkout(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _postgresql(database_url)
    factory = sessions_for(database_url)
    with scope(factory) as store:
        before = store.execute(text("select pg_backend_pid()")).scalar()
    other = session.make_engine(database_url, isolation_level="AUTOCOMMIT")
    with other.connect() as connection:
        connection.execute(text("select pg_terminate_backend(:pid)"), {"pid": before})
    other.dispose()
    monkeypatch.setattr(session, "PING_AFTER_IDLE_S", 0.0)
    with scope(factory) as store:
        after = store.execute(text("select pg_backend_pid()")).scalar()
    assert after != before
    session.dispose_all()


def test_only_the_transaction_that_asks_commits_without_waiting_for_the_flush(
    database_url: str,
) -> None:
    factory = sessions_for(database_url)
    postgresql = database_url.startswith("postgresql")
    show = "show synchronous_commit" if postgresql else "pragma synchronous"
    with scope(factory) as store:
        commit_without_flush(store)
        relaxed = store.execute(text(show)).scalar()
    with scope(factory) as store:
        default = store.execute(text(show)).scalar()
    if postgresql:
        assert (relaxed, default) == ("off", "on")
    else:  # WAL with synchronous=NORMAL (1) on every connection already
        assert (relaxed, default) == (1, 1)
    session.dispose_all()
