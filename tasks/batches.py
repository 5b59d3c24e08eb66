"""One batch of a job, run and recorded: the plain functions under the ``embed`` task
(``tasks.embed``), which local mode also calls in the submitting process.

``run_message`` parses a message, claims its batch in the ledger, embeds it and stores the
vectors, statistics, the batch's end and the job's counts in one transaction (``embed_batch``);
the (job, item) upsert makes a redelivered batch a no-op, and the claim skips a batch that
already ended without running the model. A permanent failure (a malformed message, an unknown
or broken model, bad input) is recorded with its reason (``fail_batch``, ``fail_raw``) and
returned; a transient one is raised for the task's retry policy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from storage import ledger, model_files, repository
from storage.models import BatchState
from storage.session import scope
from tasks import completion, download
from tasks.completion import JobStatus
from tasks.message import BatchMessage
from worker import lifecycle, metrics
from worker.engine import Embedder, Progress
from worker.errors import InputError, ModelError, ModelNotFoundError, ProviderError
from worker.settings import get_settings

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How one delivery of a batch ended; the task returns it as a dict for Flower."""

    job_id: str | None
    batch: int | None
    state: str
    """``done``, ``failed``, ``skipped`` (it had ended before), ``retrying``, ``waiting``
    (for its model) or ``dropped`` (a message without a job to record it in)."""
    finished: bool = False
    """True when this delivery settled the job (its completion is then signalled)."""
    texts: int = 0
    tokens: int = 0
    ms: float = 0.0
    provider: str = ""
    reason: str | None = None
    status: JobStatus | None = field(default=None, compare=False)
    """The job's final status when this delivery finished it: its completion signal carries
    it, so the waiting client need not read the job again."""

    def summary(self) -> dict[str, object]:
        return {
            key: value
            for key, value in asdict(self).items()
            if value not in (None, "", 0) and key != "status"
        }


def embed_batch(
    session: Session,
    engine: Embedder,
    message: BatchMessage,
    *,
    provider: str,
    on_progress: Progress | None = None,
    model_sha256: str | None = None,
) -> Outcome:
    """Embed one batch and store vectors, statistics, the batch's end and the job's progress;
    ``model_sha256`` (the ONNX file's, from its manifest) is recorded as the job's model file."""
    started = time.time()
    try:
        result = engine.encode(message.texts, on_progress)
    except InputError as exc:
        return fail_batch(session, message, f"batch {message.batch_index}: {exc}")
    stats = result.stats
    w0 = time.perf_counter()
    rows = [
        {
            "job_id": message.job_id,
            "item_id": item_id,
            "position": position,
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "dim": int(vector.shape[0]),
            "vector": vector.tobytes(),
            "token_count": tokens,
            "truncated": cut,
        }
        for item_id, position, text, vector, tokens, cut in zip(
            message.item_ids,
            message.positions,
            message.texts,
            result.vectors,
            result.token_counts,
            result.truncated,
            strict=True,
        )
    ]
    stored = repository.upsert_embeddings(session, rows)
    repository.cache_vectors(session, message.model, stored)
    if model_sha256 is not None and stored:  # the vectors this delivery wrote
        first = model_files.record_model_file(session, message.job_id, model_sha256)
        if first is not None:
            logger.warning(
                "batch made by another model file: job=%s batch=%d file=%s job's file=%s",
                message.job_id,
                message.batch_index,
                model_sha256,
                first,
                extra={"job": message.job_id, "batch": message.batch_index},
            )
    ledger.finish(session, message.job_id, message.batch_index, BatchState.DONE)
    write_ms = (time.perf_counter() - w0) * 1000
    wait_ms = max(0.0, (started - message.enqueued_at) * 1000)
    repository.upsert_batch_stat(
        session,
        {
            "job_id": message.job_id,
            "batch_index": message.batch_index,
            "host": lifecycle.machine_host(),  # host_name, plus the container's own name
            "pid": os.getpid(),
            "provider": provider,
            "precision": stats.precision,
            "texts": stats.texts,
            "tokens": stats.tokens,
            "padded_tokens": stats.padded_tokens,
            "queue_wait_ms": wait_ms,
            "tokenize_ms": stats.tokenize_ms,
            "inference_ms": stats.inference_ms,
            "pool_ms": stats.pool_ms,
            "write_ms": write_ms,
            "total_ms": stats.total_ms + write_ms,
        },
    )
    settled = repository.settle_progress(
        session, message.job_id, done=len(stored), failed=0, error=None
    )
    total_ms = stats.total_ms + write_ms
    metrics.observe_batch(message.model, provider, stats, write_ms, wait_ms)
    logger.info(
        "batch done: job=%s batch=%d texts=%d tokens=%d padded=%d ms=%.1f provider=%s",
        message.job_id,
        message.batch_index,
        stats.texts,
        stats.tokens,
        stats.padded_tokens,
        total_ms,
        provider,
        extra={
            "job": message.job_id,
            "batch": message.batch_index,
            "texts": stats.texts,
            "tokens": stats.tokens,
            "padded_tokens": stats.padded_tokens,
            "ms": round(total_ms, 1),
            "provider": provider,
        },
    )
    return Outcome(
        message.job_id,
        message.batch_index,
        "done",
        finished=settled is not None,
        status=None if settled is None else completion.status_of(settled),
        texts=stats.texts,
        tokens=stats.tokens,
        ms=round(total_ms, 1),
        provider=provider,
    )


def fail_batch(
    session: Session, message: BatchMessage, reason: str, kind: str = "input"
) -> Outcome:
    """Record every item of the batch as failed for ``reason`` (once, however often the batch
    is delivered), end the batch, and count the items in the job."""
    failed, finished = ledger.fail_batch(
        session, message.job_id, message.batch_index, message.item_ids, reason
    )
    metrics.observe_failure(message.model, kind, failed)
    logger.warning(
        "batch failed: job=%s batch=%d items=%d reason=%s",
        message.job_id,
        message.batch_index,
        len(message.item_ids),
        reason,
        extra={"job": message.job_id, "batch": message.batch_index, "kind": kind},
    )
    return Outcome(message.job_id, message.batch_index, "failed", finished, reason=reason)


def run_message(
    raw: object, *, local: bool = False, on_progress: Progress | None = None
) -> Outcome:
    """Parse ``raw``, claim its batch and run it with this process's engine and database.

    Permanent failures (a malformed message, an unknown or broken model, bad input) are recorded
    and returned; transient errors are raised for the caller's retry policy. A model missing on
    this host is prepared from the catalog: in this process when ``local`` (local mode), else by
    a download on this host's queue while ``ModelPendingError`` tells the caller to wait.
    """
    sessions = lifecycle.get_sessions()
    try:
        message = BatchMessage.model_validate(raw)
    except ValidationError as exc:
        return fail_raw(sessions, raw, f"malformed batch: {describe_errors(exc)}")
    try:
        engine = _engine_for(message, sessions, local)
    except (ModelError, ProviderError) as exc:
        with scope(sessions) as session:
            return fail_batch(session, message, f"model {message.model}: {exc}", kind="model")
    worker = lifecycle.process_name()
    with scope(sessions) as session:
        claim = ledger.claim(session, message.job_id, message.batch_index, worker)
        if not claim.job_exists:
            logger.error(
                "dropped batch %d of job %s, which is not in the store",
                message.batch_index,
                message.job_id,
            )
            return Outcome(message.job_id, message.batch_index, "dropped", reason="no such job")
        if claim.state is None:  # an application's raw message: the ledger learns of it now
            ledger.adopt(session, message.job_id, message.batch_index, message.item_ids, worker)
        elif not claim.claimed:
            return Outcome(message.job_id, message.batch_index, "skipped", reason=claim.state)
    if claim.job_total is not None and max(message.positions) >= claim.job_total:
        reason = f"positions up to {max(message.positions)} in a job of {claim.job_total} items"
        with scope(sessions) as session:
            return fail_batch(session, message, f"malformed batch: {reason}")
    with scope(sessions) as session:
        return embed_batch(
            session,
            engine,
            message,
            provider=engine.provider,
            on_progress=on_progress,
            model_sha256=engine.model_sha256,
        )


def _engine_for(message: BatchMessage, sessions: sessionmaker[Session], local: bool) -> Embedder:
    settings = get_settings()
    try:
        return lifecycle.get_engine(message.model)
    except ModelNotFoundError:
        if local:
            download.prepare_here(message.model, sessions, settings)
            return lifecycle.get_engine(message.model)
        waited = time.time() - (message.model_wait_since or time.time())
        if waited > settings.download_time_limit + 60:
            raise ModelError(
                f"model {message.model!r} was still not ready on"
                f" {settings.host_name} after {waited:.0f}s"
            ) from None
        download.request(message.model, sessions, settings)
        raise  # unreachable: request raises
    except ModelError as exc:  # present but unusable (corrupt, unreadable): this host says so
        download.record_failed(message.model, str(exc))
        raise


def fail_raw(sessions: sessionmaker[Session], raw: object, reason: str) -> Outcome:
    """Fail what a message that may not parse stands for: its batch when it names one the
    ledger (or its item ids) can tell, else the rest of its job; a message without a job id
    cannot be recorded anywhere and is dropped with a log line."""
    fields = raw if isinstance(raw, dict) else {}
    job_id, index = fields.get("job_id"), fields.get("batch_index")
    if not (isinstance(job_id, str) and 0 < len(job_id) <= 36 and "\x00" not in job_id):
        logger.error("dropped a batch message without a usable job id: %s", reason)
        return Outcome(None, None, "dropped", reason=reason)
    try:
        message = BatchMessage.model_validate(raw)
    except ValidationError:
        message = None
    with scope(sessions) as session:
        if repository.get_job(session, job_id) is None:
            logger.error("dropped a batch of job %s, which is not in the store: %s", job_id, reason)
            return Outcome(job_id, None, "dropped", reason=reason)
        if message is not None:
            return fail_batch(session, message, reason)
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            found = ledger.get_batch(session, job_id, index)
            if found is not None:
                _, finished = ledger.fail_batch(session, job_id, index, found.item_ids, reason)
                return Outcome(job_id, index, "failed", finished, reason=reason)
        # Which items it carried cannot be told: the job cannot complete, so it ends here.
        ledger.fail_pending(session, job_id, reason)
        finished = repository.fail_rest(session, job_id, reason)
        return Outcome(job_id, None, "failed", finished, reason=reason)


def describe_errors(exc: ValidationError) -> str:
    """Pydantic's errors in one line: where and what, without echoing the (large) input."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
