"""The producer API: ``from tasks import producer; job = producer.submit(texts)``.

It imports neither onnxruntime nor tokenizers nor torch: it writes a job row and its batches in
the ledger, then hands the batches to a publisher (``tasks.publishing``), which sends each as
one message by task name. With no broker configured (``EMBEDQ_BROKER_URL`` unset) the default
publisher runs the same task code in this process instead (local mode), so the main job works
on a laptop with nothing else running.

Every function takes the settings it works under (default: ``get_settings()``): a job is
written to, sent through and read back from the store and broker those settings name.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from storage import batch_failures, embeddings, jobs, ledger, model_catalog, stalled
from storage.models import FailureKind, Job
from storage.session import dispose_all, scope, sessions_for
from tasks import completion, gathering, job_wait, model_options, names, publishing
from tasks.completion import JobStatus
from tasks.message import BatchMessage, check_ids, check_name
from tasks.publishing import Publisher
from worker import extra
from worker.errors import EmbedqError, InputError, UnavailableError
from worker.settings import Settings, get_settings
from worker.validation import validate

# A job may hold many batches; the per-call limit applies to one batch, this to one job.
MAX_JOB_ITEMS = 1_000_000
OWNER = "owner"
"""The key of a job's ``meta`` that names the API key id it belongs to."""


class JobTimeoutError(EmbedqError):
    """Raised when ``JobHandle.wait`` runs out of time before the job finishes."""


@dataclass(frozen=True)
class JobHandle:
    """A submitted job: its id, and ways to follow it and read its vectors from the store
    named by ``settings`` (the ones it was submitted under)."""

    id: str
    settings: Settings
    submitted_at: float | None = None
    """When ``submit`` made this handle (epoch seconds); ``None`` for a handle made later."""

    @property
    def database_url(self) -> str:
        return self.settings.database_url

    @property
    def broker_url(self) -> str | None:
        """Where the worker signals completion (see ``tasks.completion``); ``None``: poll."""
        return self.settings.broker_url

    def _scope(self) -> AbstractContextManager[Session]:
        return scope(sessions_for(self.database_url))

    def status(self) -> JobStatus:
        with self._scope() as session:
            job = jobs.job_status(session, self.id)
        if job is None:
            raise EmbedqError(f"job {self.id} is not in the store")
        return completion.status_of(job)

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> JobStatus:
        """Block until the job is finished (succeeded, failed or partially failed), blocking
        on the worker's completion signal in Redis between reads of the job row (at most
        ``poll`` seconds apart); the policy is ``tasks.job_wait``'s. Raises
        ``JobTimeoutError`` after ``timeout`` seconds, saying what the job still waits for.
        """
        plan = job_wait.steps(self.just_submitted(), timeout, poll)
        status = job_wait.drive(plan, self.status, self.broker_url, self.id)
        if status is None:
            raise self.timed_out(timeout or 0)
        return status

    def timed_out(self, timeout: float) -> JobTimeoutError:
        """The error a wait of ``timeout`` seconds that saw no end raises."""
        return JobTimeoutError(f"job {self.id} not finished after {timeout:g}s: {self.pending()}")

    def just_submitted(self) -> bool:
        """Whether ``submit`` made this handle a moment ago (its signal would still be kept)."""
        return (
            self.broker_url is not None
            and self.submitted_at is not None
            and 0 <= time.time() - self.submitted_at < completion.TTL_S / 2
        )

    def pending(self) -> str:
        """What the job still waits for, in words: items done, batches pending, overdue ones."""
        stuck_after = self.settings.stuck_after
        with self._scope() as session:
            job = jobs.get_job(session, self.id)
            if job is None:
                return "the job is not in the store"
            batches = ledger.job_batches(session, self.id)
            overdue = stalled.overdue_batches(session, stuck_after, job_id=self.id, limit=5)
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
            rows = embeddings.list_vectors(session, self.id)
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
    *,
    settings: Settings | None = None,
    publisher: Publisher | None = None,
    max_items: int = MAX_JOB_ITEMS,
    owner: str | None = None,
    priority: int = names.FIRST,
) -> JobHandle:
    """Enqueue ``texts`` for embedding as one job and return its handle.

    ``owner``: the API key id the job belongs to (``OWNER`` in its ``meta``); the HTTP API
    shows a job only to its owner. ``priority``: its messages' broker priority on the
    interactive queue (``names.FIRST`` first; the bulk queue's are always ``names.LAST``).

    The job is written to the store ``settings`` name and its batches handed to ``publisher``
    (default: ``publishing.publisher_for(settings)``). Raises ``InputError`` (nothing stored)
    for input the store cannot hold, naming the item; ``UnavailableError`` when the broker
    cannot be reached (the job is recorded failed).
    """
    settings = settings or get_settings()
    clean = validate(texts, max_items, "the job limit of {} texts")
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
    if publisher is None and settings.local_mode:
        if (absent := extra.missing(*extra.RUNTIME)) is not None:
            raise EmbedqError(  # before anything is recorded: a job nobody would run
                "EMBEDQ_BROKER_URL is not set, so the job would run in this process, which needs"
                f" the worker extra ({absent} is not installed): set EMBEDQ_BROKER_URL to send"
                f" it to the workers, or {extra.INSTALL}"
            )
        ensure_schema(settings.database_url)  # local mode: a laptop needs no `embedq db upgrade`
    job_id = str(uuid.uuid4())
    meta = {OWNER: owner} if owner is not None else {}
    job = Job(id=job_id, model_name=model, queue=queue, tag=tag, total_items=len(clean), meta=meta)
    batches = plan_batches(clean, item_ids, settings.batch_size_for(queue))
    chosen = publisher or publishing.publisher_for(settings)
    if isinstance(chosen, publishing.BrokerPublisher) and len(batches) == 1:
        # With other submits of this process: one transaction, one message (tasks.gathering).
        gathering.gatherer_for(settings, chosen).submit(job, batches[0], priority)
    else:
        _record_and_publish(job, batches, settings.database_url, chosen, priority)
    return JobHandle(job_id, settings, submitted_at=time.time())


def _record_and_publish(
    job: Job, batches: list[ledger.NewBatch], url: str, publisher: Publisher, priority: int
) -> None:
    with scope(sessions_for(url)) as session:
        # A synchronous commit (it waits for PostgreSQL's WAL flush, about 3 ms here): once
        # submit returns, the job is on disk, so a database crash cannot forget a job its
        # producer was told exists. (The claim, whose loss costs only an attempt count, skips it.)
        jobs.create_job(session, job)
        ledger.add_batches(session, job.id, batches)
    now = time.time()
    try:
        messages = [
            BatchMessage.of(job.id, job.model_name, batch, now, priority) for batch in batches
        ]
        publisher.publish(messages, job.queue)
    except UnavailableError as exc:
        with scope(sessions_for(url)) as session:
            batch_failures.fail_pending(
                session, job.id, f"not enqueued: {exc}", FailureKind.UNAVAILABLE
            )
        raise


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


def register_model(
    source: str,
    name: str,
    options: dict[str, Any] | None = None,
    *,
    settings: Settings | None = None,
) -> None:
    """Record where the fleet gets model ``name``: a worker host that lacks it prepares it from
    ``source`` with ``options`` (those of ``embedq models pull``) when a batch first needs it."""
    settings = settings or get_settings()
    if not name or name.startswith(".") or any(c in name for c in "/\\"):
        raise InputError(f"{name!r} is not a usable model name")
    checked = model_options.check_options(options or {})
    if settings.local_mode:
        ensure_schema(settings.database_url)
    with scope(sessions_for(settings.database_url)) as session:
        model_catalog.register_source(session, name, source, checked)


def dispose() -> None:
    """Close the database and broker connections this process keeps (call at application
    shutdown)."""
    dispose_all()
    completion.close()
    publishing.close()


_migrated: set[str] = set()


def ensure_schema(url: str) -> None:
    """Create or migrate the schema once per process (local mode needs no `db upgrade`)."""
    if url not in _migrated:
        from storage import schema  # alembic, needed once per process and only here

        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        schema.upgrade(url)
        _migrated.add(url)
