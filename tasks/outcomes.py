"""How one delivery of a batch ended: what ``tasks.batches`` and the feeder return, what the
``embed`` task hands Flower (``Outcome.summary``), and whether it settled its job; and, for a
batch the engine ran, what it hands the store (``finished_batch``) and how that is logged and
counted once stored (``stored_outcome``)."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field, fields
from enum import StrEnum

from storage import batch_results
from storage.models import FailureKind
from tasks import completion
from tasks.completion import JobStatus
from tasks.message import BatchMessage
from worker import lifecycle, metrics
from worker.engine import Encoding

logger = logging.getLogger("tasks.batches")  # the batch log lines keep their logger's name


class Delivery(StrEnum):
    """How one delivery of a batch ended."""

    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    """It had ended before (a redelivery)."""
    RETRYING = "retrying"
    WAITING = "waiting_for_model"
    """Sent again later: its host prepares the batch's model."""
    DROPPED = "dropped"
    """A message without a job to record it in."""


@dataclass(frozen=True)
class Outcome:
    """How one delivery of a batch ended; the task returns it as a dict for Flower."""

    job_id: str | None
    batch: int | None
    state: Delivery
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
        # Shallow (not ``asdict``, which deep-copies ``status``): one per job of an embed_many.
        pairs = ((f.name, getattr(self, f.name)) for f in fields(self) if f.name != "status")
        return {
            key: str(value) if key == "state" else value
            for key, value in pairs
            if value not in (None, "", 0)
        }


def finished_batch(
    message: BatchMessage,
    result: Encoding,
    refused: dict[str, str],
    provider: str,
    started: float,
    model_sha256: str | None = None,
    host: str | None = None,
) -> batch_results.FinishedBatch:
    """What the store is handed for one batch the engine ran (see ``store_encoded``)."""
    kept = [i for i in range(len(message.texts)) if message.item_ids[i] not in refused]
    stats = result.stats
    dim = int(result.vectors.shape[1])
    rows = [  # in embeddings.COLUMNS order
        (
            message.job_id,
            message.item_ids[i],
            message.positions[i],
            hashlib.sha256(message.texts[i].encode("utf-8")).hexdigest(),
            dim,
            vector.tobytes(),
            tokens,
            cut,
        )
        for i, vector, tokens, cut in zip(
            kept, result.vectors, result.token_counts, result.truncated, strict=True
        )
    ]
    timing = {
        "host": host or lifecycle.machine_host(),  # host_name, plus the container's own name
        "pid": os.getpid(),
        "provider": provider,
        "precision": stats.precision,
        "texts": stats.texts,
        "tokens": stats.tokens,
        "padded_tokens": stats.padded_tokens,
        "queue_wait_ms": max(0.0, (started - message.enqueued_at) * 1000),
        "tokenize_ms": stats.tokenize_ms,
        "inference_ms": stats.inference_ms,
        "pool_ms": stats.pool_ms,
    }
    return batch_results.FinishedBatch(
        job_id=message.job_id,
        index=message.batch_index,
        model=message.model,
        model_sha256=model_sha256,
        rows=rows,
        timing=timing,
        compute_ms=stats.total_ms,
        refused=refused,
        stats=stats,
    )


def stored_outcome(
    message: BatchMessage,
    finished: batch_results.FinishedBatch,
    stored: batch_results.StoredBatch,
    provider: str,
) -> Outcome:
    """Log and count a stored batch, and say how its delivery ended."""
    stats = finished.stats
    if stored.other_model_file is not None:
        logger.warning(
            "batch made by another model file: job=%s batch=%d file=%s job's file=%s",
            message.job_id,
            message.batch_index,
            finished.model_sha256,
            stored.other_model_file,
            extra={"job": message.job_id, "batch": message.batch_index},
        )
    if stored.failed:
        metrics.observe_failure(message.model, FailureKind.INPUT, stored.failed)
    total_ms = stats.total_ms + stored.write_ms
    metrics.observe_batch(
        message.model, provider, stats, stored.write_ms, finished.timing["queue_wait_ms"]
    )
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
        Delivery.DONE,
        finished=stored.status is not None,
        status=None if stored.status is None else completion.status_of(stored.status),
        texts=stats.texts,
        tokens=stats.tokens,
        ms=round(total_ms, 1),
        provider=provider,
        reason=next(iter(finished.refused.values()), None),
    )
