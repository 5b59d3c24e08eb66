"""``tasks.publishing``: ``send``, the one way a batch message is put on the broker (here an app
object that records what it is asked to send), and the publisher the settings call for."""

from __future__ import annotations

from typing import Any

import pytest

from storage.ledger import NewBatch
from tasks import names, publishing
from tasks.local import LocalPublisher
from tasks.message import BatchMessage
from worker.settings import Settings

LONG = "a long text that Flower and the logs must never show whole, " * 3


class RecordingApp:
    """A Celery app that keeps the keyword arguments of each ``send_task``."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, **kwargs: Any) -> None:
        self.sent.append({"name": name, **kwargs})


def message(index: int = 3) -> BatchMessage:
    batch = NewBatch(index, ["doc-1", "doc-2"], [LONG, "short"], [4, 1])
    return BatchMessage.of("job-1", "minilm", batch, 1000.0)


def test_a_batch_is_sent_by_task_name_under_its_batch_s_task_id() -> None:
    app = RecordingApp()
    body = message().body()
    publishing.send(app, body, names.Queue.BULK)
    (sent,) = app.sent
    assert sent["name"] == names.EMBED == "embedq.embed"
    assert sent["args"] == [body]
    assert sent["queue"] == "bulk"
    assert sent["task_id"] == "job-1.3" == message().task_id
    assert (sent["countdown"], sent["retries"]) == (None, 0)
    assert (sent["producer"], sent["connection"]) == (None, None)


def test_a_resend_keeps_the_id_it_came_with_and_carries_its_delay_and_tries() -> None:
    app = RecordingApp()
    producer, connection = object(), object()
    publishing.send(
        app,
        message().body(),
        "interactive",
        producer=producer,  # type: ignore[arg-type]
        connection=connection,  # type: ignore[arg-type]
        countdown=4.5,
        retries=2,
        sent_as="custom-task-id",
    )
    (sent,) = app.sent
    assert sent["task_id"] == "custom-task-id"
    assert (sent["queue"], sent["countdown"], sent["retries"]) == ("interactive", 4.5, 2)
    assert sent["producer"] is producer and sent["connection"] is connection


def test_bulk_goes_last_and_an_interactive_message_keeps_its_priority() -> None:
    app = RecordingApp()
    heavy = {**message().body(), "priority": 6}
    publishing.send(app, heavy, names.Queue.BULK)
    publishing.send(app, heavy, names.Queue.INTERACTIVE)
    publishing.send(app, message().body(), names.Queue.INTERACTIVE)
    for nonsense in ("6", True, -3, 42, None):  # a raw message's: within the steps, or first
        publishing.send(app, {**message().body(), "priority": nonsense}, "interactive")
    sent = [task["priority"] for task in app.sent]
    assert sent == [names.LAST, 6, names.FIRST, names.FIRST, names.FIRST, 0, 9, names.FIRST]
    publishing.send_together(app, [heavy, {**heavy, "priority": 3}], "interactive", producer=None)
    assert app.sent[-1]["priority"] == 3  # a gathered message goes at its lightest member's


def test_what_flower_shows_is_ids_and_sizes_never_whole_texts() -> None:
    app = RecordingApp()
    publishing.send(app, message().body(), "bulk")
    shown = app.sent[0]["argsrepr"]
    assert shown == f"job=job-1 batch=3 model=minilm texts=2 first={LONG[:40] + '...'!r}"
    assert LONG not in shown and "short" not in shown


def test_a_raw_body_that_does_not_parse_is_sent_and_shown_as_far_as_it_can_be() -> None:
    app = RecordingApp()
    raw = {"job_id": "job-2", "texts": "not a list"}
    publishing.send(app, raw, "bulk")
    (sent,) = app.sent
    assert sent["args"] == [raw] and sent["task_id"] == "job-2.0"
    assert sent["argsrepr"] == "job=job-2 batch=None model=None"


def test_the_settings_choose_the_publisher() -> None:
    local = publishing.publisher_for(Settings(broker_url=None))
    assert isinstance(local, LocalPublisher)
    broker = Settings(broker_url="redis://127.0.0.1:1/0")  # never reached: nothing is sent
    kept = publishing.publisher_for(broker)
    assert isinstance(kept, publishing.BrokerPublisher)
    assert kept.url == "redis://127.0.0.1:1/0"
    assert publishing.publisher_for(broker) is kept  # one per broker for this process
    publishing.close()
    assert publishing.publisher_for(broker) is not kept
    publishing.close()


@pytest.mark.parametrize("queue", list(names.Queue))
def test_every_queue_name_travels_as_its_text(queue: names.Queue) -> None:
    app = RecordingApp()
    publishing.send(app, message().body(), queue)
    assert app.sent[0]["queue"] == str(queue)
