"""What a batch that ran leaves in the store, written by one call in the caller's transaction:
its vectors (an upsert per (job, item), so a redelivery writes nothing twice), the content
cache, the model file that made them, the texts the model refused, the batch's end in the
ledger, its timing, and the job's counts and state.

The caller says "store this finished batch"; the statements behind it are this module's to
choose (issue 20 makes them bulk writes). Functions take the session first and never commit.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row
from sqlalchemy.orm import Session

from storage import batch_stats, content_cache, embeddings, failed_items, jobs, ledger, model_files
from storage.models import BatchState, FailureKind


@dataclass(frozen=True)
class FinishedBatch:
    """A batch's results, as the worker hands them to the store."""

    job_id: str
    index: int
    model: str
    """The model's name: the content cache's key."""
    model_sha256: str | None
    """The model file that made the vectors (its manifest's sha256), recorded with the job."""
    rows: Sequence[Mapping[str, Any]]
    """Embedding rows: job_id, item_id, position, text_sha256, dim, vector, token_count,
    truncated."""
    timing: Mapping[str, Any]
    """``batch_stats.FIELDS`` but ``write_ms`` and ``total_ms``, which the store measures."""
    compute_ms: float
    """The engine's time for the batch (``total_ms`` adds the write to it)."""
    refused: Mapping[str, str] = field(default_factory=dict)
    """Items the model refused, with the reason: recorded failed (input), the rest stored."""


@dataclass(frozen=True)
class StoredBatch:
    """What storing a finished batch did."""

    stored: int
    """Vectors this call inserted (0 for a redelivered batch)."""
    failed: int
    """Refused items this call recorded failed."""
    write_ms: float
    other_model_file: str | None
    """The job's first model file when this batch's file is another one (the caller warns)."""
    status: Row[*tuple[Any, ...]] | None
    """The job's final status when this batch finished the job (``jobs.job_status``'s
    columns), else ``None``."""


def store_finished(session: Session, batch: FinishedBatch) -> StoredBatch:
    """Store a batch that ran: see the module. Returns what was written."""
    started = time.perf_counter()
    inserted = embeddings.upsert_embeddings(session, batch.rows)
    content_cache.cache_vectors(session, batch.model, inserted)
    other = None
    if batch.model_sha256 is not None and inserted:  # the vectors this delivery wrote
        other = model_files.record_model_file(session, batch.job_id, batch.model_sha256)
    failed, error = 0, None
    for reason, items in _by_reason(batch.refused).items():
        failed += failed_items.record_failures(
            session, batch.job_id, items, reason, FailureKind.INPUT
        )
        error = error or reason
    ledger.finish(session, batch.job_id, batch.index, BatchState.DONE, error)
    write_ms = (time.perf_counter() - started) * 1000
    batch_stats.upsert_batch_stat(
        session,
        {
            **batch.timing,
            "job_id": batch.job_id,
            "batch_index": batch.index,
            "write_ms": write_ms,
            "total_ms": batch.compute_ms + write_ms,
        },
    )
    status = jobs.settle_progress(
        session,
        batch.job_id,
        done=len(inserted),
        failed=failed,
        error=error,
        kind=FailureKind.INPUT if error else None,
    )
    return StoredBatch(len(inserted), failed, write_ms, other, status)


def _by_reason(refused: Mapping[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for item_id, reason in refused.items():
        grouped.setdefault(reason, []).append(item_id)
    return grouped
