"""A write the store refuses for a while is tried again in place with the vectors kept
(``tasks.writing``): the model runs once per batch, alone or through the feeder; tries stop at
the retry bound or half the time limit, and a permanent error is raised at once."""

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy import exc as sql
from sqlalchemy.orm import Session

from storage import batch_results, ledger
from storage.session import dispose_all, scope, sessions_for
from tasks import producer, writing
from tasks.batches import run_message
from tasks.message import BatchMessage
from tasks.outcomes import Delivery
from tests.fakes import FakeEngine, RecordingPublisher, fake_runtime, run_in_task_threads
from worker.engine import Encoding, Progress
from worker.settings import Settings


class CountingEngine(FakeEngine):
    """The fake engine, counting the texts it ran."""

    def __init__(self) -> None:
        super().__init__(dim=8)
        self.texts = 0

    def encode(self, texts: Sequence[object], on_progress: Progress | None = None) -> Encoding:
        self.texts += len(texts)
        return super().encode(texts, on_progress)


def disk_full() -> sql.OperationalError:
    return sql.OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))


def refusing(times: int, write: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    """``write``, refused with SQLite's full-disk error its first ``times`` calls."""
    calls = [0]

    def refused(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] <= times:
            raise disk_full()
        return write(*args)

    return refused, calls


@pytest.fixture
def settings(sqlite_url: str) -> Iterator[Settings]:
    yield Settings(
        database_url=sqlite_url,
        default_model="fake",
        job_batch_size=4,
        retry_backoff_max=0.01,  # the pauses between tries: milliseconds here
        transient_retries=3,
        in_flight=4,
        coalesce_wait_ms=1,
    )
    dispose_all()


def submitted(settings: Settings, texts: list[str]) -> tuple[producer.JobHandle, BatchMessage]:
    sent = RecordingPublisher()
    handle = producer.submit(texts, settings=settings, publisher=sent)
    return handle, sent.sent[0]


def test_a_write_refused_twice_is_written_with_the_vectors_made_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = CountingEngine()
    handle, message = submitted(settings, ["alpha", "beta", "gamma"])
    store, calls = refusing(2, batch_results.store_finished)
    monkeypatch.setattr(batch_results, "store_finished", store)
    outcome = run_message(message.body(), fake_runtime(settings, engine))
    assert (outcome.state, calls[0], engine.texts) == (Delivery.DONE, 3, 3)
    assert handle.status()["state"] == "succeeded"


def test_tries_stop_at_the_retry_bound_with_the_last_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = CountingEngine()
    handle, message = submitted(settings, ["alpha"])
    store, calls = refusing(100, batch_results.store_finished)
    monkeypatch.setattr(batch_results, "store_finished", store)
    with pytest.raises(sql.OperationalError, match="disk is full"):
        run_message(message.body(), fake_runtime(settings, engine))
    assert (calls[0], engine.texts) == (settings.transient_retries + 1, 1)
    with scope(sessions_for(settings.database_url)) as session:
        batch = ledger.get_batch(session, message.job_id, message.batch_index)
        assert batch is not None and batch.last_error is not None
        assert batch.last_error.startswith(f"write try {settings.transient_retries}: ")
    assert handle.status()["state"] == "queued"  # still pending: the task's retries decide


def test_tries_stop_before_half_the_time_limit(settings: Settings) -> None:
    calls = [0]
    pauses: list[float] = []

    def write(session: Session) -> None:
        calls[0] += 1
        raise disk_full()

    late = time.time() - settings.task_time_limit / 2  # the batch left the queue long ago
    with pytest.raises(sql.OperationalError):
        writing.keep_writing(
            sessions_for(settings.database_url),
            write,
            settings,
            started=late,
            batches=[],
            sleep=pauses.append,
        )
    assert (calls[0], pauses) == (1, [])


def test_a_permanent_error_is_raised_without_another_try(settings: Settings) -> None:
    calls = [0]

    def write(session: Session) -> None:
        calls[0] += 1
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        writing.keep_writing(
            sessions_for(settings.database_url),
            write,
            settings,
            started=time.time(),
            batches=[],
            sleep=lambda pause: pytest.fail("slept before a permanent error"),
        )
    assert calls[0] == 1


def test_the_feeder_writes_a_refused_group_again_without_running_the_model_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = CountingEngine()
    sent = RecordingPublisher()
    handles = [producer.submit([f"t{i}"], settings=settings, publisher=sent) for i in range(4)]
    store, calls = refusing(2, batch_results.store_group)
    monkeypatch.setattr(batch_results, "store_group", store)
    ended = run_in_task_threads(fake_runtime(settings, engine), sent.sent)
    assert [getattr(result, "state", result) for result in ended] == [Delivery.DONE] * 4
    assert engine.texts == 4  # each text ran once, however the writes were grouped
    assert calls[0] >= 3
    assert {handle.status()["state"] for handle in handles} == {"succeeded"}


def test_the_feeder_raises_a_write_error_that_outlasts_its_tries_in_each_task(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = CountingEngine()
    sent = RecordingPublisher()
    for i in range(3):
        producer.submit([f"t{i}"], settings=settings, publisher=sent)
    store, _ = refusing(10_000, batch_results.store_group)
    monkeypatch.setattr(batch_results, "store_group", store)
    ended = run_in_task_threads(fake_runtime(settings, engine), sent.sent)
    assert all(isinstance(result, sql.OperationalError) for result in ended), ended
    assert engine.texts == 3  # no batch was run alone after its group's write failed
