"""The gatherer (``tasks.gathering``) over real Redis and both stores: one-text jobs submitted
while another group is being sent become one transaction and one ``embed_many`` message whose
header names each batch; the fleet's presence and release checks see every batch in it; and a
broker that cannot be reached fails every job of the group as not enqueued."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import redis
from celery.exceptions import WorkerLostError
from sqlalchemy import func, select

from storage.models import Batch, FailureKind, Job, JobState
from storage.session import scope, sessions_for
from tasks import gathering, names, producer
from tasks.fleet import broker, step
from tasks.message import BatchMessage
from tasks.publishing import BrokerPublisher, task_id
from worker import lifecycle
from worker.errors import UnavailableError
from worker.settings import Settings

JOBS = 20


class HeldPublisher(BrokerPublisher):
    """The broker's publisher, whose first send waits until the test lets it go, so the
    submits that come meanwhile wait together."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.sending = threading.Event()
        self.go = threading.Event()
        self.sizes: list[int] = []

    def publish_together(self, messages: Sequence[BatchMessage], queue: names.Queue | str) -> None:
        self.sizes.append(len(messages))
        if len(self.sizes) == 1:
            self.sending.set()
            assert self.go.wait(30)
        super().publish_together(messages, queue)


@pytest.fixture
def settings(redis_url: str, database_url: str) -> Iterator[Settings]:
    yield Settings(broker_url=redis_url, database_url=database_url)
    producer.dispose()


def submit_while_held(settings: Settings, publisher: HeldPublisher) -> list[Any]:
    """``JOBS`` one-text jobs from as many threads: the first is sent alone and held, the rest
    wait in the gatherer meanwhile; what each submit returned or raised."""
    results: list[Any] = [None] * JOBS

    def one(i: int) -> None:
        try:
            results[i] = producer.submit(
                [f"text {i}"], model="m", settings=settings, publisher=publisher
            )
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(0,))]
    threads[0].start()
    assert publisher.sending.wait(30)
    gatherer = gathering.gatherer_for(settings, publisher)
    threads += [threading.Thread(target=one, args=(i,)) for i in range(1, JOBS)]
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 30
    while gatherer._inbox.qsize() < JOBS - 1:  # every other submit waits for the held send
        assert time.monotonic() < deadline, "the submits did not reach the gatherer"
        time.sleep(0.005)
    publisher.go.set()
    for thread in threads:
        thread.join(60)
    assert gatherer.groups == 2
    return results


def test_jobs_submitted_meanwhile_go_in_one_transaction_and_one_message(
    settings: Settings, redis_client: redis.Redis
) -> None:
    publisher = HeldPublisher(settings)
    handles = submit_while_held(settings, publisher)
    assert publisher.sizes == [1, JOBS - 1]
    queued = [json.loads(item) for item in redis_client.lrange(names.Queue.INTERACTIVE, 0, -1)]
    assert sorted(message["headers"]["task"] for message in queued) == [
        names.EMBED,
        names.EMBED_MANY,
    ]
    (together,) = [m for m in queued if m["headers"]["task"] == names.EMBED_MANY]
    members = together["headers"][names.MEMBERS]
    ids = {task_id(handle.id, 0) for handle in handles}
    assert len(members) == JOBS - 1 and set(members) < ids
    with scope(sessions_for(settings.database_url)) as session:
        states = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        assert [tuple(row) for row in states] == [(JobState.QUEUED, JOBS)]
        assert session.scalar(select(func.count()).select_from(Batch)) == JOBS
    assert broker.redis_presence(settings.celery_broker())(ids) == ids
    # A worker holds the message unacknowledged: releasing any one batch of it releases all.
    redis_client.lrem(names.Queue.INTERACTIVE, 0, json.dumps(together))
    redis_client.hset("unacked", "tag-1", json.dumps([together, "", "interactive"]))
    released = broker.redis_release(settings.celery_broker())({members[3]})
    assert set(members) <= released
    assert redis_client.hlen("unacked") == 0


def test_a_broker_out_of_reach_fails_every_job_of_the_group_as_not_enqueued(
    database_url: str,
) -> None:
    closed = Settings(broker_url="redis://127.0.0.1:9/0", database_url=database_url)
    try:
        results = submit_while_held(closed, HeldPublisher(closed))
    finally:
        producer.dispose()
    assert all(isinstance(result, UnavailableError) for result in results), results
    with scope(sessions_for(database_url)) as session:
        ended = session.execute(select(Job.state, Job.error_kind, Job.error)).all()
    assert len(ended) == JOBS
    for state, kind, error in ended:
        assert (state, kind) == (JobState.FAILED, FailureKind.UNAVAILABLE)
        assert error.startswith("not enqueued")


def test_a_worker_lost_while_it_ran_a_gathered_message_fails_each_batch(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``record_lost``, as the worker's parent calls it for an ``embed_many`` message whose
    pool process died for good: each batch in it ends failed, its job with it."""
    from tests.fakes import RecordingPublisher

    sent = RecordingPublisher()
    handles = [
        producer.submit([f"t{i}"], model="m", settings=settings, publisher=sent) for i in range(3)
    ]
    monkeypatch.setattr(lifecycle, "get_sessions", lambda: sessions_for(settings.database_url))
    monkeypatch.setattr(step, "get_settings", lambda: settings)

    class Sender:
        name = names.EMBED_MANY
        request = type("Request", (), {"retries": 2})()

    bodies = [message.body() for message in sent.sent]
    step.record_lost(Sender(), WorkerLostError("killed by signal 9"), [bodies])  # type: ignore[arg-type]
    for handle in handles:
        status = handle.status()
        assert (status["state"], status["failed"]) == ("failed", 1), status
