"""The ``embed`` task: one queue message is one batch of one job.

The task is a thin shell: it validates the JSON payload, opens a transaction and calls
``embed_batch``, which takes its collaborators (session, engine) as arguments so tests can run
it directly. Vectors, statistics and the job's counts are written in that one transaction; the
(job, item) upsert makes a redelivered batch a no-op.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.orm import Session

from storage import repository
from storage.models import BatchState
from tasks import names
from worker import (
    lifecycle,  # connects the signals that warm each pool process
    logs,  # noqa: F401  (JSON log lines when EMBEDQ_LOG_JSON is set)
    metrics,  # serves /metrics from the worker's parent when EMBEDQ_METRICS_PORT is set
)
from worker.app import app
from worker.engine import Embedder, Progress
from worker.errors import (
    EmbedqError,
    InputError,
    ModelError,
    ModelNotFoundError,
    ProviderError,
)
from worker.settings import get_settings

logger = logging.getLogger(__name__)


class EmbedPayload(BaseModel):
    """The JSON a producer sends for one batch (see README, "Message format")."""

    job_id: str
    batch_index: int = Field(ge=0)
    model: str
    texts: list[str] = Field(min_length=1)
    item_ids: list[str]
    positions: list[int]
    enqueued_at: float
    model_wait_since: float | None = None
    """Set by the worker when it re-enqueues a batch whose model its host is preparing."""


def embed_batch(
    session: Session,
    engine: Embedder,
    payload: EmbedPayload,
    *,
    provider: str,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Embed one batch and store vectors, statistics and progress in ``session``."""
    started = time.time()
    try:
        result = engine.encode(payload.texts, on_progress)
    except InputError as exc:
        return fail_items(session, payload, f"batch {payload.batch_index}: {exc}")
    stats = result.stats
    w0 = time.perf_counter()
    rows = [
        {
            "job_id": payload.job_id,
            "item_id": item_id,
            "position": position,
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "dim": int(vector.shape[0]),
            "vector": vector.tobytes(),
            "token_count": tokens,
            "truncated": cut,
        }
        for item_id, position, text, vector, tokens, cut in zip(
            payload.item_ids,
            payload.positions,
            payload.texts,
            result.vectors,
            result.token_counts,
            result.truncated,
            strict=True,
        )
    ]
    stored = repository.upsert_embeddings(session, rows)
    repository.cache_vectors(session, payload.model, stored)
    repository.finish_batch(session, payload.job_id, payload.batch_index, BatchState.DONE)
    write_ms = (time.perf_counter() - w0) * 1000
    repository.upsert_batch_stat(
        session,
        {
            "job_id": payload.job_id,
            "batch_index": payload.batch_index,
            "host": get_settings().host_name,  # as in `models` and the download queue
            "pid": os.getpid(),
            "provider": provider,
            "texts": stats.texts,
            "tokens": stats.tokens,
            "padded_tokens": stats.padded_tokens,
            "queue_wait_ms": max(0.0, (started - payload.enqueued_at) * 1000),
            "tokenize_ms": stats.tokenize_ms,
            "inference_ms": stats.inference_ms,
            "pool_ms": stats.pool_ms,
            "write_ms": write_ms,
            "total_ms": stats.total_ms + write_ms,
        },
    )
    finished = repository.add_progress(
        session, payload.job_id, done=len(stored), failed=0, error=None
    )
    total_ms = stats.total_ms + write_ms
    wait_ms = max(0.0, (started - payload.enqueued_at) * 1000)
    metrics.observe_batch(payload.model, provider, stats, write_ms, wait_ms)
    logger.info(
        "batch done: job=%s batch=%d texts=%d tokens=%d padded=%d ms=%.1f provider=%s",
        payload.job_id,
        payload.batch_index,
        stats.texts,
        stats.tokens,
        stats.padded_tokens,
        total_ms,
        provider,
        extra={
            "job": payload.job_id,
            "batch": payload.batch_index,
            "texts": stats.texts,
            "tokens": stats.tokens,
            "padded_tokens": stats.padded_tokens,
            "ms": round(total_ms, 1),
            "provider": provider,
        },
    )
    return {
        "job_id": payload.job_id,
        "batch": payload.batch_index,
        "texts": stats.texts,
        "tokens": stats.tokens,
        "ms": round(stats.total_ms + write_ms, 1),
        "provider": provider,
        "finished": finished,
    }


def fail_items(
    session: Session, payload: EmbedPayload, reason: str, kind: str = "input"
) -> dict[str, Any]:
    """Record every item of the batch as failed for ``reason`` (once, however often the batch
    is delivered) and count them in the job."""
    failed = repository.record_failures(session, payload.job_id, payload.item_ids, reason)
    metrics.observe_failure(payload.model, kind, failed)
    repository.finish_batch(session, payload.job_id, payload.batch_index, BatchState.FAILED)
    finished = repository.add_progress(session, payload.job_id, done=0, failed=failed, error=reason)
    return {
        "job_id": payload.job_id,
        "batch": payload.batch_index,
        "failed": reason,
        "finished": finished,
    }


def run_payload(
    raw: dict[str, Any], *, local: bool = False, on_progress: Progress | None = None
) -> dict[str, Any]:
    """Validate ``raw`` and run it with this process's engine and database; a batch that can
    never succeed (bad payload, unknown model) fails its items with a stored reason.

    A model missing on this host is prepared from the catalog: in this process when ``local``
    (local mode), else by a download on this host's queue while ``ModelPendingError`` tells the
    caller to try the batch again later.
    """
    from storage.session import scope
    from tasks import download

    settings = get_settings()
    sessions = lifecycle.get_sessions()
    try:
        payload = EmbedPayload.model_validate(raw)
    except ValidationError as exc:
        job_id = raw.get("job_id") if isinstance(raw, dict) else None
        if not isinstance(job_id, str):
            return {"job_id": None, "failed": "malformed batch without a job id"}
        texts = raw.get("texts")
        count = len(texts) if isinstance(texts, list) else 0
        return _fail(sessions, job_id, count, f"malformed batch: {exc}")
    try:
        try:
            engine = lifecycle.get_engine(payload.model)
        except ModelNotFoundError:
            if local:
                download.prepare_here(payload.model, sessions, settings)
                engine = lifecycle.get_engine(payload.model)
            else:
                waited = time.time() - (payload.model_wait_since or time.time())
                if waited > settings.download_time_limit + 60:
                    raise ModelError(
                        f"model {payload.model!r} was still not ready on"
                        f" {settings.host_name} after {waited:.0f}s"
                    ) from None
                download.request(payload.model, sessions, settings)
                raise  # unreachable: request raises
    except (ModelError, ProviderError) as exc:
        with scope(sessions) as session:
            return fail_items(session, payload, f"model {payload.model}: {exc}", kind="model")
    with scope(sessions) as session:
        return embed_batch(
            session, engine, payload, provider=engine.provider, on_progress=on_progress
        )


def _fail(sessions: Any, job_id: str, count: int, reason: str) -> dict[str, Any]:
    """Record ``count`` items of ``job_id`` as failed for ``reason``; the worker goes on."""
    from storage.session import scope

    with scope(sessions) as session:
        finished = repository.add_progress(session, job_id, done=0, failed=count, error=reason)
    return {"job_id": job_id, "failed": reason, "finished": finished}


@app.task(  # type: ignore[untyped-decorator]
    name=names.EMBED,
    bind=True,
    ignore_result=True,
    throws=(EmbedqError,),
    max_retries=get_settings().max_retries,
    default_retry_delay=1,
)
def embed(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Embed one batch of a job (see ``EmbedPayload``) and store the vectors."""
    from tasks import completion
    from tasks.download import ModelPendingError
    from tasks.producer import shown

    try:
        summary = run_payload(payload, on_progress=_progress_events(self))
    except ModelPendingError as pending:
        # Sent again under the same task id with a countdown; this message is acknowledged
        # when the task returns, so the batch is never without a message. Not ``retry()``:
        # that would spend the retries that bound a batch which keeps killing its worker.
        delivery = self.request.delivery_info or {}
        self.apply_async(
            args=[{**payload, "model_wait_since": payload.get("model_wait_since") or time.time()}],
            countdown=get_settings().model_wait_interval,
            queue=delivery.get("routing_key") or names.Queue.INTERACTIVE,
            task_id=self.request.id,
            argsrepr=shown(payload),
        )
        return {"job_id": payload.get("job_id"), "waiting_for_model": pending.name}
    if summary.get("finished"):  # committed: wake whoever waits for this job
        completion.signal(get_settings().celery_broker(), summary["job_id"])
    return summary


def _progress_events(task: Any, every_s: float = 1.0) -> Progress:
    """A ``task-progress`` event at most once a second while a batch runs: Flower shows custom
    task events (``update_state`` alone sends none); the job's own progress is in SQL."""
    last = [time.monotonic()]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s and done < total:
            last[0] = now
            task.send_event("task-progress", current=done, total=total)

    return report
