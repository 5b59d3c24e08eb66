"""The producer API: ``from tasks import producer; job = producer.submit(texts)``.

It imports neither onnxruntime nor tokenizers nor torch: it writes a job row, splits the texts
into batches and sends each as one message by task name. With no broker configured
(``EMBEDQ_BROKER_URL`` unset) it runs the same task code in this process instead (local mode),
so the main job works on a laptop with nothing else running.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage import repository
from storage.models import Job, JobState
from storage.session import dispose_all, scope, sessions_for
from tasks import completion, names
from worker.errors import EmbedqError, InputError
from worker.settings import get_settings
from worker.validation import validate

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

    def _scope(self) -> Any:
        return scope(sessions_for(self.database_url))

    def status(self) -> dict[str, Any]:
        with self._scope() as session:
            job = repository.get_job(session, self.id)
            if job is None:
                raise EmbedqError(f"job {self.id} is not in the store")
            return {
                "id": job.id,
                "state": str(job.state),
                "model": job.model_name,
                "total": job.total_items,
                "done": job.done_items,
                "failed": job.failed_items,
                "error": job.error,
            }

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        """Block until the job is finished (succeeded, failed or partially failed).

        Between reads of the job row it blocks on the worker's completion signal in Redis for
        up to ``poll`` seconds, so it returns as soon as the job is done. Without Redis it polls
        at a tenth of the time waited so far (every 1 ms at first, at most every ``poll``).
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        while True:
            status = self.status()
            if JobState(status["state"]) in TERMINAL:
                return status
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise JobTimeoutError(f"job {self.id} not finished after {timeout}s: {status}")
            pause = poll if deadline is None else max(0.0, min(poll, deadline - now))
            if not completion.block(self.broker_url, self.id, pause):
                time.sleep(min(pause, max(0.001, (now - started) / 10)))

    def embeddings(self) -> tuple[list[str], np.ndarray]:
        """The item ids and a float32 array of their vectors, in input order."""
        with self._scope() as session:
            rows = repository.list_embeddings(session, self.id)
            ids = [row.item_id for row in rows]
            if not rows:
                return ids, np.zeros((0, 0), dtype=np.float32)
            vectors = np.stack([np.frombuffer(row.vector, dtype=np.float32) for row in rows])
        return ids, vectors


def submit(
    texts: Sequence[str],
    model: str | None = None,
    ids: Sequence[str] | None = None,
    queue: str = names.Queue.INTERACTIVE,
    tag: str | None = None,
) -> JobHandle:
    """Enqueue ``texts`` for embedding as one job and return its handle."""
    settings = get_settings()
    clean = validate(texts, MAX_JOB_ITEMS)
    model = model or settings.default_model
    if not model:
        raise InputError("no model given and EMBEDQ_DEFAULT_MODEL is not set")
    item_ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(clean))]
    if len(item_ids) != len(clean) or len(set(item_ids)) != len(item_ids):
        raise InputError("ids must be unique and as many as the texts")
    queue = names.Queue(queue)
    job_id = str(uuid.uuid4())
    url = settings.database_url
    if settings.broker_url is None:
        ensure_schema(url)  # local mode: a laptop needs no separate `embedq db upgrade`
    with scope(sessions_for(url)) as session:
        repository.create_job(
            session,
            Job(id=job_id, model_name=model, queue=queue, tag=tag, total_items=len(clean), meta={}),
        )
    size = settings.job_batch_size
    # Batches of texts of similar length: each message's padding stays small (the engine pads
    # a micro-batch to its longest text). Positions carry the input order back.
    order = sorted(range(len(clean)), key=lambda i: len(clean[i]))
    payloads = [
        {
            "job_id": job_id,
            "batch_index": index,
            "model": model,
            "texts": [clean[i] for i in chunk],
            "item_ids": [item_ids[i] for i in chunk],
            "positions": chunk,
            "enqueued_at": time.time(),
        }
        for index, chunk in enumerate(
            order[start : start + size] for start in range(0, len(order), size)
        )
    ]
    send_payloads(payloads, queue)
    return JobHandle(job_id, url, settings.broker_url)


def register_model(source: str, name: str, options: dict[str, Any] | None = None) -> None:
    """Record where the fleet gets model ``name``: a worker host that lacks it prepares it from
    ``source`` with ``options`` (those of ``embedq models pull``) when a batch first needs it."""
    from tasks.download import check_options

    if not name or name.startswith(".") or any(c in name for c in "/\\"):
        raise InputError(f"{name!r} is not a usable model name")
    checked = check_options(options or {})
    url = get_settings().database_url
    if get_settings().broker_url is None:
        ensure_schema(url)
    with scope(sessions_for(url)) as session:
        repository.register_source(session, name, source, checked)


def dispose() -> None:
    """Close the database and broker connections this process keeps (call at application
    shutdown)."""
    dispose_all()
    completion.close()
    while _connections:
        _, connection = _connections.popitem()
        connection.release()


_migrated: set[str] = set()


def ensure_schema(url: str) -> None:
    """Create or migrate the schema once per process (local mode needs no `db upgrade`)."""
    if url not in _migrated:
        from storage import schema

        if url.startswith("sqlite:///"):
            from pathlib import Path

            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        schema.upgrade(url)
        _migrated.add(url)


def send_payloads(payloads: list[dict[str, Any]], queue: names.Queue) -> None:
    """Send batches by task name, or run them here in local mode (no broker configured)."""
    settings = get_settings()
    if settings.broker_url is None:
        from tasks.embed import run_payload  # local mode: the same code, in this process

        for payload in payloads:
            run_payload(payload, local=True)
        return
    from worker.app import app

    connection = _connection(settings.broker_url)
    for payload in payloads:
        app.send_task(
            names.EMBED,
            args=[payload],
            queue=str(queue),
            connection=connection,
            argsrepr=shown(payload),
        )


def shown(payload: dict[str, Any]) -> str:
    """What Flower and the logs show of a batch: ids and sizes, never whole texts."""
    texts = payload["texts"]
    first = texts[0][:40] + ("..." if len(texts[0]) > 40 else "") if texts else ""
    return (
        f"job={payload['job_id']} batch={payload['batch_index']} model={payload['model']}"
        f" texts={len(texts)} first={first!r}"
    )


_connections: dict[tuple[int, int, str], Any] = {}


def _connection(url: str) -> Any:
    """This thread's connection to the broker the settings name now (not when the app was
    built), kept: opening one and declaring the queues again cost 4-5 ms, more than the rest of
    a one-text submit. Kombu connections are not shared between threads or processes."""
    import os
    import threading

    from worker.app import app

    key = (os.getpid(), threading.get_ident(), url)
    if key not in _connections:
        _connections[key] = app.connection_for_write(url)
    return _connections[key]
