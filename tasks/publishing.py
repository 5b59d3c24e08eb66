"""How a batch reaches the broker: ``send``, the one function that puts a batch message on a
queue (by task name, under its deterministic task id), and the publishers that producers,
backfills and the reconciler hand their batches to.

A ``Publisher`` is passed in: ``BrokerPublisher`` sends to the configured broker, a local-mode
publisher (``tasks.local.LocalPublisher``) runs each batch in this process, and tests hand in
their own. ``publisher_for(settings)`` picks the one the settings call for.

Celery and kombu are imported when a message is first sent, not when this module is imported:
a producer in local mode never loads them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import RedisError

from storage.session import redacted
from tasks import names
from tasks.message import BatchMessage, shown, task_id
from worker.errors import UnavailableError
from worker.settings import Settings

if TYPE_CHECKING:
    from celery import Celery
    from kombu.connection import Connection
    from kombu.messaging import Producer


def send(
    app: Celery,
    body: Mapping[str, Any],
    queue: str,
    *,
    producer: Producer | None = None,
    connection: Connection | None = None,
    countdown: float | None = None,
    retries: int = 0,
    sent_as: str | None = None,
) -> None:
    """Put one batch message (``body``, the ``embed`` task's argument) on ``queue``, under its
    batch's task id (``sent_as`` when a redelivered message keeps the id it came with), on
    ``producer`` or ``connection`` when given, else on one from the app's pool."""
    job_id, index = body.get("job_id"), body.get("batch_index")
    app.send_task(
        names.EMBED,
        args=[dict(body)],
        queue=queue,
        task_id=sent_as or task_id(str(job_id), index if isinstance(index, int) else 0),
        producer=producer,
        connection=connection,
        countdown=countdown,
        retries=retries,
        priority=priority_of(body, queue),
        argsrepr=shown(body),
    )


def priority_of(body: Mapping[str, Any], queue: str) -> int:
    """The broker priority of a batch message on ``queue`` (``names.FIRST`` first): ``LAST`` on
    the bulk queue, else the one its body carries (``FIRST`` when it carries none it may)."""
    if queue == names.Queue.BULK:
        return names.LAST
    given = body.get("priority")
    if isinstance(given, int) and not isinstance(given, bool):
        return min(max(given, names.FIRST), names.LAST)
    return names.FIRST


def send_together(
    app: Celery, bodies: Sequence[Mapping[str, Any]], queue: str, *, producer: Producer | None
) -> None:
    """Put several batch messages on ``queue`` as one ``embed_many`` message (one broker
    message, one Celery hand-off and ack for all of them); its header names each batch's task
    id (``names.MEMBERS``), as the fleet's presence checks read it."""
    ids = [task_id(str(body.get("job_id")), int(body.get("batch_index") or 0)) for body in bodies]
    app.send_task(
        names.EMBED_MANY,
        args=[[dict(body) for body in bodies]],
        queue=queue,
        task_id=f"{ids[0]}+{len(ids) - 1}",
        producer=producer,
        priority=min(priority_of(body, queue) for body in bodies),
        headers={names.MEMBERS: ids},
        argsrepr=f"{len(bodies)} batches, the first {shown(bodies[0])}",
    )


class Publisher(Protocol):
    """Takes batches already recorded in the ledger and sees that they run."""

    def publish(self, messages: Sequence[BatchMessage], queue: names.Queue | str) -> None:
        """Raises ``UnavailableError`` when the batches cannot be handed on."""


class BrokerPublisher:
    """Sends to the broker the settings name, on a producer kept per thread with its
    connection: opening one and declaring the queues again cost 4-5 ms, more than the rest of
    a one-text submit (kombu connections are not shared between threads or processes).

    A job's messages leave in one Redis pipeline (one round trip for the whole job); when that
    fails (most likely a connection the broker dropped as it restarted) they are sent once more
    on a new connection, one by one with kombu's reconnecting retries. A message that did get
    through the first time is then sent twice, which the ledger makes harmless (its second
    delivery finds the batch claimed or ended)."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.celery_broker()
        self._producers: dict[tuple[int, int], Producer] = {}

    def publish(self, messages: Sequence[BatchMessage], queue: names.Queue | str) -> None:
        self._twice(
            lambda: self._send(messages, str(queue), batched=True),
            lambda: self._send(messages, str(queue), batched=False),
        )

    def publish_together(self, messages: Sequence[BatchMessage], queue: names.Queue | str) -> None:
        """``publish``, as one ``embed_many`` message when there are several."""
        if len(messages) < 2:
            self.publish(messages, queue)
            return
        from worker.app import app

        bodies = [message.body() for message in messages]

        def send() -> None:
            send_together(app, bodies, str(queue), producer=self._producer())

        self._twice(send, send)

    def _twice(self, first: Callable[[], None], again: Callable[[], None]) -> None:
        """``first``; when the broker fails it, ``again`` on a new connection; when that fails
        too, ``UnavailableError``."""
        from kombu.exceptions import KombuError  # kombu comes with celery: loaded to send only

        errors = (KombuError, RedisError, OSError)
        try:
            first()
        except errors:
            self._drop()
            try:
                again()
            except errors as exc:
                self._drop()
                raise UnavailableError(
                    f"the broker at {redacted(self.url)} cannot be reached: {exc}"
                ) from exc

    def _send(self, messages: Sequence[BatchMessage], queue: str, batched: bool) -> None:
        from worker.app import app  # the Celery app: loaded when a batch is first sent

        producer = self._producer()
        with producer.batch() if batched else contextlib.nullcontext():  # type: ignore[no-untyped-call]
            for message in messages:
                send(app, message.body(), queue, producer=producer)

    def _producer(self) -> Producer:
        from worker.app import app

        key = (os.getpid(), threading.get_ident())
        if key not in self._producers:
            connection = app.connection_for_write(self.url)
            self._producers[key] = app.amqp.Producer(connection, auto_declare=False)
        return self._producers[key]

    def _drop(self) -> None:
        """Forget this thread's broken connection, so the next send opens a new one."""
        producer = self._producers.pop((os.getpid(), threading.get_ident()), None)
        if producer is not None:
            with contextlib.suppress(Exception):  # already broken; nothing to release
                producer.connection.release()

    def close(self) -> None:
        """Release every connection this publisher holds (at shutdown)."""
        while self._producers:
            _, producer = self._producers.popitem()
            with contextlib.suppress(Exception):
                producer.connection.release()


_defaults: dict[str, Publisher] = {}


def publisher_for(settings: Settings) -> Publisher:
    """The publisher the settings call for, kept per broker for this process: the broker's,
    or, with no broker configured (local mode), one that runs batches in this process."""
    if settings.local_mode:
        # Local mode runs the task's code here: the engine, onnxruntime and tokenizers are
        # imported only in this case, never by a producer that sends.
        from tasks.local import LocalPublisher

        return LocalPublisher(settings)
    url = settings.celery_broker()
    if url not in _defaults:
        _defaults[url] = BrokerPublisher(settings)
    return _defaults[url]


def close() -> None:
    """Release the connections of this process's publishers."""
    while _defaults:
        _, publisher = _defaults.popitem()
        if isinstance(publisher, BrokerPublisher):
            publisher.close()
