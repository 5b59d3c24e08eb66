"""The producer API: ``from tasks import producer; job = producer.submit(texts)``.

It imports neither onnxruntime nor tokenizers nor torch: it writes a job row, splits the texts
into batches and sends each as one message by task name. With no broker configured
(``EMBEDQ_BROKER_URL`` unset) it runs the same task code in this process instead (local mode),
so the main job works on a laptop with nothing else running.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from redis.exceptions import RedisError
from sqlalchemy.orm import Session

from storage import ledger, repository
from storage.models import Job, JobState
from storage.session import dispose_all, redacted, scope, sessions_for
from tasks import completion, names, retry
from tasks.completion import JobStatus
from tasks.message import BatchMessage, check_ids, check_name, task_id
from worker import extra
from worker.errors import EmbedqError, InputError, UnavailableError
from worker.settings import get_settings
from worker.validation import validate

if TYPE_CHECKING:
    from kombu.messaging import Producer

TERMINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.PARTIALLY_FAILED}
# A job may hold many batches; the per-call limit applies to one batch, this to one job.
MAX_JOB_ITEMS = 1_000_000


class JobTimeoutError(EmbedqError):
    """Raised when ``JobHandle.wait`` runs out of time before the job finishes."""


@dataclass(frozen=True)
class JobHandle:
    """A submitted job: its id, and ways to follow it and read its vectors from the store."""

    id: str
    database_url: str
    broker_url: str | None = None
    """Where the worker signals completion (see ``tasks.completion``); ``None``: poll."""
    submitted_at: float | None = None
    """When ``submit`` made this handle (epoch seconds); ``None`` for a handle made later."""

    def _scope(self) -> AbstractContextManager[Session]:
        return scope(sessions_for(self.database_url))

    def status(self) -> JobStatus:
        with self._scope() as session:
            job = repository.job_status(session, self.id)
        if job is None:
            raise EmbedqError(f"job {self.id} is not in the store")
        return completion.status_of(job)

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> JobStatus:
        """Block until the job is finished (succeeded, failed or partially failed).

        Between reads of the job row it blocks on the worker's completion signal in Redis for
        up to ``poll`` seconds, so it returns as soon as the job is done (with the status the
        signal carries, when it carries one). Without Redis it polls at a tenth of the time
        waited so far (every 1 ms at first, at most every ``poll``).
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        # A job submitted a moment ago is not done yet, and its signal would still be kept in
        # Redis: the first look is at the signal, not the store.
        look = not self._just_submitted()
        while True:
            if look:
                status = self.status()
                if JobState(status["state"]) in TERMINAL:
                    return status
            now = time.monotonic()
            if deadline is not None and now > deadline:
                if look:
                    raise JobTimeoutError(
                        f"job {self.id} not finished after {timeout:g}s: {self.pending()}"
                    )
                look = True  # one look at the store before giving up
                continue
            look = True
            pause = poll if deadline is None else max(0.0, min(poll, deadline - now))
            signalled, final = completion.receive(self.broker_url, self.id, pause)
            if final is not None and JobState(final["state"]) in TERMINAL:
                return final
            if not signalled:
                time.sleep(min(pause, max(0.001, (now - started) / 10)))

    def _just_submitted(self) -> bool:
        return (
            self.broker_url is not None
            and self.submitted_at is not None
            and 0 <= time.time() - self.submitted_at < completion.TTL_S / 2
        )

    def pending(self) -> str:
        """What the job still waits for, in words: items done, batches pending, overdue ones."""
        stuck_after = get_settings().stuck_after
        with self._scope() as session:
            job = repository.get_job(session, self.id)
            if job is None:
                return "the job is not in the store"
            batches = ledger.job_batches(session, self.id)
            overdue = ledger.overdue_batches(session, stuck_after, job_id=self.id, limit=5)
            words = (
                f"{job.done_items} of {job.total_items} items done, {job.failed_items} failed;"
                f" {batches.get('sent', 0)} of {sum(batches.values())} batches pending"
            )
            if overdue:
                shown = ", ".join(str(b.batch_index) for b in overdue)
                words += (
                    f"; overdue (no progress for over {stuck_after:g}s): batch {shown} (is a worker"
                    f" consuming {job.queue!r}? workers re-send lost batches)"
                )
            return words

    def embeddings(self) -> tuple[list[str], np.ndarray]:
        """The item ids and a float32 array of their vectors, in input order."""
        with self._scope() as session:
            rows = repository.list_vectors(session, self.id)
        ids = [row.item_id for row in rows]
        if not rows:
            return ids, np.zeros((0, 0), dtype=np.float32)
        return ids, np.stack([np.frombuffer(row.vector, dtype=np.float32) for row in rows])


def submit(
    texts: Sequence[str],
    model: str | None = None,
    ids: Sequence[str] | None = None,
    queue: str = names.Queue.INTERACTIVE,
    tag: str | None = None,
) -> JobHandle:
    """Enqueue ``texts`` for embedding as one job and return its handle.

    Raises ``InputError`` (nothing stored) for input the store cannot hold, naming the item;
    ``UnavailableError`` when the broker cannot be reached (the job is recorded failed).
    """
    settings = get_settings()
    clean = validate(texts, MAX_JOB_ITEMS, "the job limit of {} texts")
    model = model or settings.default_model
    if not model:
        raise InputError("no model given and EMBEDQ_DEFAULT_MODEL is not set")
    check_name(model, "model name")
    if tag is not None:
        check_name(tag, "tag")
    item_ids = check_ids(ids, len(clean)) if ids is not None else list(map(str, range(len(clean))))
    try:
        queue = names.Queue(queue)
    except ValueError:
        raise InputError(f"unknown queue {queue!r}: use {[str(q) for q in names.Queue]}") from None
    if settings.local_mode and (absent := extra.missing(*extra.RUNTIME)) is not None:
        raise EmbedqError(  # before anything is recorded: a job nobody would run
            "EMBEDQ_BROKER_URL is not set, so the job would run in this process, which needs the"
            f" worker extra ({absent} is not installed): set EMBEDQ_BROKER_URL to send it to the"
            f" workers, or {extra.INSTALL}"
        )
    job_id = str(uuid.uuid4())
    url = settings.database_url
    if settings.local_mode:
        ensure_schema(url)  # local mode: a laptop needs no separate `embedq db upgrade`
    batches = plan_batches(clean, item_ids, settings.job_batch_size)
    with scope(sessions_for(url)) as session:
        # A synchronous commit (it waits for PostgreSQL's WAL flush, about 3 ms here): once
        # submit returns, the job is on disk, so a database crash cannot forget a job its
        # producer was told exists. (The claim, whose loss costs only an attempt count, skips it.)
        repository.create_job(
            session,
            Job(id=job_id, model_name=model, queue=queue, tag=tag, total_items=len(clean), meta={}),
        )
        ledger.add_batches(session, job_id, batches)
    now = time.time()
    messages = [message_for(job_id, model, batch, now) for batch in batches]
    try:
        publish(messages, queue)
    except UnavailableError as exc:
        with scope(sessions_for(url)) as session:
            ledger.fail_pending(session, job_id, f"not enqueued: {exc}")
        raise
    return JobHandle(job_id, url, settings.broker_url, submitted_at=time.time())


def plan_batches(texts: list[str], item_ids: list[str], size: int) -> list[ledger.NewBatch]:
    """Batches of texts of similar length: each message's padding stays small (the engine pads
    a micro-batch to its longest text). Positions carry the input order back."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [
        ledger.NewBatch(
            index=index,
            item_ids=[item_ids[i] for i in chunk],
            texts=[texts[i] for i in chunk],
            positions=chunk,
        )
        for index, chunk in enumerate(
            order[start : start + size] for start in range(0, len(order), size)
        )
    ]


def message_for(job_id: str, model: str, batch: ledger.NewBatch, now: float) -> BatchMessage:
    """The message of a batch already checked and recorded (built without validating again)."""
    return BatchMessage.model_construct(
        job_id=job_id,
        batch_index=batch.index,
        model=model,
        texts=batch.texts,
        item_ids=batch.item_ids,
        positions=batch.positions,
        enqueued_at=now,
        model_wait_since=None,
        tries=0,
    )


def register_model(source: str, name: str, options: dict[str, Any] | None = None) -> None:
    """Record where the fleet gets model ``name``: a worker host that lacks it prepares it from
    ``source`` with ``options`` (those of ``embedq models pull``) when a batch first needs it."""
    from tasks.download import check_options  # it imports the celery app: see _producer

    if not name or name.startswith(".") or any(c in name for c in "/\\"):
        raise InputError(f"{name!r} is not a usable model name")
    checked = check_options(options or {})
    url = get_settings().database_url
    if get_settings().local_mode:
        ensure_schema(url)
    with scope(sessions_for(url)) as session:
        repository.register_source(session, name, source, checked)


def dispose() -> None:
    """Close the database and broker connections this process keeps (call at application
    shutdown)."""
    dispose_all()
    completion.close()
    while _producers:
        _, producer = _producers.popitem()
        producer.connection.release()


_migrated: set[str] = set()


def ensure_schema(url: str) -> None:
    """Create or migrate the schema once per process (local mode needs no `db upgrade`)."""
    if url not in _migrated:
        from storage import schema  # alembic, needed once per process and only here

        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        schema.upgrade(url)
        _migrated.add(url)


def publish(messages: Sequence[BatchMessage], queue: names.Queue) -> None:
    """Send batches by task name, or run them here in local mode (no broker configured).
    Raises ``UnavailableError`` when the broker cannot be reached."""
    settings = get_settings()
    if settings.local_mode:
        # Local mode runs the task's code here: the engine, onnxruntime and tokenizers are
        # imported only in this case, never by a producer that sends.
        from tasks.batches import fail_raw, run_message
        from worker import lifecycle

        for message in messages:
            raw = message.model_dump(mode="json")
            try:
                run_message(raw, local=True)
            except Exception as exc:  # no retries in local mode: the batch ends with the reason
                fail_raw(lifecycle.get_sessions(), raw, retry.describe(exc))
        return
    from kombu.exceptions import KombuError  # kombu comes with celery: loaded to send only

    url = settings.celery_broker()  # the configured broker: not local mode
    errors = (KombuError, RedisError, OSError)
    try:
        _send(messages, queue, url, batched=True)
    except errors:
        # Most likely a connection the broker dropped (it restarted): once more on a new one,
        # message by message with kombu's reconnecting retries. A batch that did get through
        # the first time is then sent twice, which the ledger makes harmless (its second
        # delivery finds the batch claimed or ended).
        _drop_connection(url)
        try:
            _send(messages, queue, url, batched=False)
        except errors as exc:
            _drop_connection(url)
            raise UnavailableError(
                f"the broker at {redacted(url)} cannot be reached: {exc}"
            ) from exc


def _send(messages: Sequence[BatchMessage], queue: names.Queue, url: str, batched: bool) -> None:
    """Send the messages by task name on this thread's producer. Batched: every message and
    its task-sent event leave in one Redis pipeline, one round trip for the whole job (sent
    one by one, each message and each event was a round trip and a new redis-py client)."""
    from worker.app import app  # celery: see _producer

    producer = _producer(url)
    with producer.batch() if batched else contextlib.nullcontext():  # type: ignore[no-untyped-call]
        for message in messages:
            app.send_task(
                names.EMBED,
                args=[message.model_dump(mode="json")],
                queue=str(queue),
                task_id=task_id(message.job_id, message.batch_index),
                producer=producer,
                argsrepr=message.shown(),
            )


_producers: dict[tuple[int, int, str], Producer] = {}


def _producer(url: str) -> Producer:
    """This thread's producer on the broker the settings name now (not when the app was
    built), kept with its connection: opening one and declaring the queues again cost 4-5 ms,
    more than the rest of a one-text submit. Kombu connections are not shared between threads
    or processes."""
    from worker.app import app  # celery: loaded when a job is first sent, not to submit locally

    key = (os.getpid(), threading.get_ident(), url)
    if key not in _producers:
        _producers[key] = app.amqp.Producer(app.connection_for_write(url), auto_declare=False)
    return _producers[key]


def _drop_connection(url: str) -> None:
    """Forget this thread's broken connection, so the next send opens a new one."""
    producer = _producers.pop((os.getpid(), threading.get_ident(), url), None)
    if producer is not None:
        with contextlib.suppress(Exception):  # already broken; nothing to release
            producer.connection.release()
