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
from tasks import names
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

    def wait(self, timeout: float | None = None, poll: float = 0.1) -> dict[str, Any]:
        """Block until the job is finished (succeeded, failed or partially failed).

        The store is polled every millisecond at first, backing off to ``poll`` seconds: a
        one-text job is back in a few milliseconds, and a long one costs a query per ``poll``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.001
        while True:
            status = self.status()
            if JobState(status["state"]) in TERMINAL:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise JobTimeoutError(f"job {self.id} not finished after {timeout}s: {status}")
            time.sleep(pause)
            pause = min(poll, pause * 1.5)

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
        _ensure_schema(url)  # local mode: a laptop needs no separate `embedq db upgrade`
    with scope(sessions_for(url)) as session:
        repository.create_job(
            session,
            Job(id=job_id, model_name=model, queue=queue, tag=tag, total_items=len(clean), meta={}),
        )
    size = settings.job_batch_size
    payloads = [
        {
            "job_id": job_id,
            "batch_index": index,
            "model": model,
            "texts": clean[start : start + size],
            "item_ids": item_ids[start : start + size],
            "positions": list(range(start, min(start + size, len(clean)))),
            "enqueued_at": time.time(),
        }
        for index, start in enumerate(range(0, len(clean), size))
    ]
    _send(payloads, queue)
    return JobHandle(job_id, url)


def register_model(source: str, name: str, options: dict[str, Any] | None = None) -> None:
    """Record where the fleet gets model ``name``: a worker host that lacks it prepares it from
    ``source`` with ``options`` (those of ``embedq models pull``) when a batch first needs it."""
    from tasks.download import check_options

    if not name or name.startswith(".") or any(c in name for c in "/\\"):
        raise InputError(f"{name!r} is not a usable model name")
    checked = check_options(options or {})
    url = get_settings().database_url
    if get_settings().broker_url is None:
        _ensure_schema(url)
    with scope(sessions_for(url)) as session:
        repository.register_source(session, name, source, checked)


def dispose() -> None:
    """Close the database connections this process keeps (call at application shutdown)."""
    dispose_all()


_migrated: set[str] = set()


def _ensure_schema(url: str) -> None:
    if url not in _migrated:
        from storage import schema

        if url.startswith("sqlite:///"):
            from pathlib import Path

            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        schema.upgrade(url)
        _migrated.add(url)


def _send(payloads: list[dict[str, Any]], queue: names.Queue) -> None:
    settings = get_settings()
    if settings.broker_url is None:
        from tasks.embed import run_payload  # local mode: the same code, in this process

        for payload in payloads:
            run_payload(payload, local=True)
        return
    from worker.app import app

    # One connection per job, to the broker the settings name now (not when the app was built).
    with app.connection_for_write(settings.broker_url) as connection:
        for payload in payloads:
            app.send_task(names.EMBED, args=[payload], queue=str(queue), connection=connection)
