"""What the one-text round trip relies on: the producer's batched send over real Redis (and its
second try when the first fails), the final status a completion signal carries to ``wait``,
PostgreSQL connections pinged only after sitting idle, and commits that skip the WAL flush
only in the transaction that asks."""

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, event, text

from storage import session
from storage.models import FailureKind, Job, JobState
from storage.session import commit_without_flush, scope, sessions_for
from tasks import completion, names, producer
from tasks.batches import embed_batch
from tasks.message import BatchMessage
from tasks.outcomes import Outcome
from tasks.publishing import BrokerPublisher
from tests.fakes import FakeEngine, RecordingPublisher
from worker.errors import UnavailableError
from worker.settings import Settings


@pytest.fixture
def settings(redis_url: str, sqlite_url: str) -> Iterator[Settings]:
    """A producer's settings: the tests' Redis as the broker, a SQLite store, two texts a
    batch."""
    yield Settings(broker_url=redis_url, database_url=sqlite_url, job_batch_size=2)
    producer.dispose()


class FlakyPublisher(BrokerPublisher):
    """The broker's publisher, whose batched sends fail as on a connection the broker dropped
    while restarting; with ``down``, every send fails."""

    def __init__(self, settings: Settings, down: bool = False) -> None:
        super().__init__(settings)
        self.down = down
        self.tries: list[bool] = []

    def _send(self, messages: Sequence[BatchMessage], queue: str, batched: bool) -> None:
        self.tries.append(batched)
        if batched or self.down:
            raise redis.ConnectionError("the broker restarted")
        super()._send(messages, queue, batched)


def _queued(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def test_a_job_s_batches_reach_the_queue_with_their_task_ids_in_one_send(
    settings: Settings, redis_client: redis.Redis
) -> None:
    job = producer.submit(["a", "bb", "ccc", "dddd", "eeeee"], model="m", settings=settings)
    messages = _queued(redis_client, str(names.Queue.INTERACTIVE))
    ids = sorted(message["headers"]["id"] for message in messages)
    assert ids == [f"{job.id}.0", f"{job.id}.1", f"{job.id}.2"]
    assert all(message["headers"]["task"] == names.EMBED for message in messages)


def test_a_failed_batched_send_is_tried_once_more_message_by_message(
    settings: Settings, redis_client: redis.Redis
) -> None:
    flaky = FlakyPublisher(settings)
    try:
        job = producer.submit(["a", "bb", "ccc"], model="m", settings=settings, publisher=flaky)
    finally:
        flaky.close()
    assert flaky.tries == [True, False]
    assert len(_queued(redis_client, str(names.Queue.INTERACTIVE))) == 2
    assert job.status()["state"] == JobState.QUEUED


def test_a_send_that_fails_twice_fails_the_job_as_unavailable(
    settings: Settings, redis_client: redis.Redis
) -> None:
    down = FlakyPublisher(settings, down=True)
    with pytest.raises(UnavailableError, match="cannot be reached"):
        producer.submit(["a", "bb", "ccc"], model="m", settings=settings, publisher=down)
    assert down.tries == [True, False]
    assert _queued(redis_client, str(names.Queue.INTERACTIVE)) == []
    with scope(sessions_for(settings.database_url)) as store:
        (job,) = store.query(Job).all()
        assert (job.state, job.failed_items) == (JobState.FAILED, 3)
        assert job.error_kind == FailureKind.UNAVAILABLE


def _finished_job(settings: Settings) -> tuple[producer.JobHandle, Outcome]:
    """A one-text job submitted and embedded here; the batch's outcome."""
    sent = RecordingPublisher()
    job = producer.submit(["one text"], model="fake", settings=settings, publisher=sent)
    with scope(sessions_for(job.database_url)) as store:
        outcome = embed_batch(store, FakeEngine(), sent.sent[0], provider="FakeProvider")
    return job, outcome


def test_the_finishing_batch_hands_its_signal_the_status_wait_returns(
    settings: Settings, tmp_path: Path
) -> None:
    job, outcome = _finished_job(settings)
    assert outcome.finished and outcome.status == job.status()
    assert outcome.status is not None
    assert outcome.status["state"] == "succeeded" and "status" not in outcome.summary()
    completion.signal(settings.broker_url or "", job.id, outcome.status)

    # The same job followed through a store that cannot be opened: a read would fail.
    unreadable = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}/gone/x.db"})
    blind = producer.JobHandle(job.id, unreadable, submitted_at=job.submitted_at)
    assert blind.wait(timeout=10) == outcome.status


def test_a_signal_without_a_status_sends_wait_to_the_store(settings: Settings) -> None:
    job, outcome = _finished_job(settings)
    completion.signal(settings.broker_url or "", job.id)  # as the worker's parent signals a
    started = time.monotonic()  # lost batch's end
    assert job.wait(timeout=10) == outcome.status
    assert time.monotonic() - started < 0.4  # woken by the signal, not after a poll


def test_a_just_submitted_job_waited_on_with_no_time_left_is_still_looked_up(
    settings: Settings,
) -> None:
    job, outcome = _finished_job(settings)  # done, but never signalled
    assert job.wait(timeout=0) == outcome.status
    queued = producer.submit(
        ["another"], model="fake", settings=settings, publisher=RecordingPublisher()
    )
    with pytest.raises(producer.JobTimeoutError):
        queued.wait(timeout=0)


# --- PostgreSQL connections ----------------------------------------------------------------


def _idle_for(engine: Engine, seconds: float) -> None:
    """From now on, each connection the pool takes back looks idle for ``seconds`` already, as
    if that much time passed before its next checkout (``storage.session`` notes the time of
    each checkin)."""

    def age(_connection: Any, record: Any) -> None:
        record.info["checked_in"] -= seconds

    event.listen(engine, "checkin", age)


def test_a_connection_used_a_moment_ago_is_not_pinged_and_an_idle_one_is(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = sessions_for(postgres_url)
    engine: Engine = factory.kw["bind"]
    pings: list[float] = []
    ping = engine.dialect.do_ping

    def counted(connection: Any) -> bool:  # SQLAlchemy's ping, counted
        pings.append(time.monotonic())
        return bool(ping(connection))

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    for _ in range(3):
        with scope(factory) as store:
            store.execute(text("select 1"))
    assert len(pings) == 1  # the new connection's first checkout only
    _idle_for(engine, session.PING_AFTER_IDLE_S + 1)
    with scope(factory) as store:  # checked in before the listener: used a moment ago
        store.execute(text("select 1"))
    assert len(pings) == 1
    with scope(factory) as store:  # idle for over PING_AFTER_IDLE_S since that checkin
        store.execute(text("select 1"))
    assert len(pings) == 2
    session.dispose_all()


def test_a_connection_that_died_while_idle_is_replaced_at_checkout(postgres_url: str) -> None:
    factory = sessions_for(postgres_url)
    _idle_for(factory.kw["bind"], session.PING_AFTER_IDLE_S + 1)
    with scope(factory) as store:
        before = store.execute(text("select pg_backend_pid()")).scalar()
    other = session.make_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with other.connect() as connection:
        connection.execute(text("select pg_terminate_backend(:pid)"), {"pid": before})
    other.dispose()
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
