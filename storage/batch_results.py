"""What a batch that ran leaves in the store, written by one call in the caller's transaction:
the batch's end in the ledger, its vectors, the model file that made them, the texts the model
refused, its timing, and the job's counts and state.

The batch is ended first (``UPDATE .. WHERE state = 'sent'``): of two deliveries of one batch,
only the one whose update ends it writes anything (the other waits on the row lock, then finds
it ended and writes nothing), so the vectors can go in by the store's bulk write
(``embeddings.insert_embeddings``: COPY on PostgreSQL, one executemany on SQLite) with no
conflict check per row. A batch the ledger has no row for (an application's message the worker
did not adopt) is written by the upsert instead, which skips items already stored; so is a
batch whose bulk write meets an item stored anyway (two batches of one job naming one item),
under a savepoint.

The job's counts are written last, by a statement that never counts past the job's
``total_items`` (``jobs.OverfullJobError``): a batch the job has no room for (a message for a job
that had ended, or one its ledger cannot account for) then raises, and its transaction, rolled
back, stores nothing of it.

Functions take the session first and never commit.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage import batch_stats, embeddings, failed_items, jobs, ledger, model_files
from storage.models import BatchState, FailureKind


@dataclass(frozen=True)
class FinishedBatch:
    """A batch's results, as the worker hands them to the store."""

    job_id: str
    index: int
    model: str
    """The model's name."""
    model_sha256: str | None
    """The model file that made the vectors (its manifest's sha256), recorded with the job."""
    rows: Sequence[Sequence[Any]]
    """Embedding rows, tuples in ``embeddings.COLUMNS`` order."""
    timing: Mapping[str, Any]
    """``batch_stats.FIELDS`` but ``write_ms`` and ``total_ms``, which the store measures."""
    compute_ms: float
    """The engine's time for the batch (``total_ms`` adds the write to it)."""
    refused: Mapping[str, str] = field(default_factory=dict)
    """Items the model refused, with the reason: recorded failed (input), the rest stored."""
    stats: Any = None
    """The engine's ``EncodeStats`` for the batch, for the caller's log and metrics (the store
    reads ``timing``)."""


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
    """Store a batch that ran: see the module. Returns what was written (nothing when another
    delivery of the batch had ended it)."""
    started = time.perf_counter()
    error = next(iter(batch.refused.values()), None)
    if not ledger.finish(session, batch.job_id, batch.index, BatchState.DONE, error):
        if ledger.batch_state(session, batch.job_id, batch.index) is not None:
            return StoredBatch(0, 0, (time.perf_counter() - started) * 1000, None, None)
        inserted = _upsert(session, batch.rows)  # a batch the ledger does not know
    else:
        (inserted,) = _insert(session, [batch.rows])
    other = None
    if batch.model_sha256 is not None and inserted:  # the vectors this delivery wrote
        other = model_files.record_model_file(session, batch.job_id, batch.model_sha256)
    failed = 0
    for reason, items in _by_reason(batch.refused).items():
        failed += failed_items.record_failures(
            session, batch.job_id, items, reason, FailureKind.INPUT
        )
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
        done=inserted,
        failed=failed,
        error=error,
        kind=FailureKind.INPUT if error else None,
    )
    return StoredBatch(inserted, failed, write_ms, other, status)


def store_group(session: Session, group: Sequence[FinishedBatch]) -> list[StoredBatch]:
    """Store batches that ran as one engine call (the feeder's group), none with refused
    texts, in as few statements as the store allows whatever their number: their ends in the
    ledger (one UPDATE .. RETURNING), their vectors (one COPY or executemany), their model
    files (one read, a write per new file), their statistics (one executemany) and their jobs'
    counts and states (one executemany, one UPDATE .. RETURNING). A batch this call could not
    end (another delivery had) writes nothing; one the ledger does not know is stored alone
    (``store_finished``). Returns what was written for each batch, in order; a job's final
    status goes with its last batch in the group."""
    if any(batch.refused for batch in group):
        raise ValueError("store_group takes batches with no refused texts: see store_finished")
    started = time.perf_counter()
    ended = ledger.finish_done(session, [(batch.job_id, batch.index) for batch in group])
    own = [batch for batch in group if (batch.job_id, batch.index) in ended]
    alone = {
        id(batch): store_finished(session, batch)
        for batch in group
        if (batch.job_id, batch.index) not in ended
        and ledger.batch_state(session, batch.job_id, batch.index) is None
    }
    inserted = dict(zip(map(id, own), _insert(session, [b.rows for b in own]), strict=True))
    files = {b.job_id: b.model_sha256 for b in own if b.model_sha256 and inserted[id(b)]}
    others = model_files.record_model_files(session, files)
    texts = sum(len(batch.rows) for batch in own) or 1
    write_ms = (time.perf_counter() - started) * 1000
    shares = {id(batch): write_ms * len(batch.rows) / texts for batch in own}
    batch_stats.insert_batch_stats(
        session,
        [
            {
                **batch.timing,
                "job_id": batch.job_id,
                "batch_index": batch.index,
                "write_ms": shares[id(batch)],
                "total_ms": batch.compute_ms + shares[id(batch)],
            }
            for batch in own
        ],
    )
    done: dict[str, int] = {}
    for batch in own:
        done[batch.job_id] = done.get(batch.job_id, 0) + inserted[id(batch)]
    settled = jobs.settle_many(session, done)
    last = {batch.job_id: id(batch) for batch in own}
    results = []
    for batch in group:
        if id(batch) in alone:
            results.append(alone[id(batch)])
        elif id(batch) not in inserted:  # another delivery had ended it
            results.append(StoredBatch(0, 0, 0.0, None, None))
        else:
            status = settled.get(batch.job_id) if last[batch.job_id] == id(batch) else None
            results.append(
                StoredBatch(
                    inserted[id(batch)], 0, shares[id(batch)], others.get(batch.job_id), status
                )
            )
    return results


BULK_FROM = 32
"""Rows from which a batch's vectors go in by the bulk write; fewer (a one-text job) go in by
the upsert, one statement with no savepoint around it, which costs less than setting up a COPY
(measured: one-text jobs ran 12% slower by COPY)."""


def _insert(session: Session, batches: Sequence[Sequence[Sequence[Any]]]) -> list[int]:
    """The rows of ``batches`` (ended by this transaction) in one bulk write under a savepoint;
    an item already stored there sends them to the upsert, as does a write too small to pay
    for a COPY. Returns the rows each batch inserted."""
    rows = [row for batch in batches for row in batch]
    if len(rows) >= BULK_FROM:
        try:
            with session.begin_nested():
                embeddings.insert_embeddings(session, rows)
            return [len(batch) for batch in batches]
        except IntegrityError:
            pass
    if len(batches) == 1:
        return [_upsert(session, batches[0])]
    # One statement for the group (a feeder's group of one-text jobs is many batches of one
    # row): the rows it inserted, counted back to their batches by (job, item).
    new = set(embeddings.upsert_embeddings(session, [_named(row) for row in rows]))
    return [sum((str(row[0]), str(row[1])) in new for row in batch) for batch in batches]


def _upsert(session: Session, rows: Sequence[Sequence[Any]]) -> int:
    return len(embeddings.upsert_embeddings(session, [_named(row) for row in rows]))


def _named(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(embeddings.COLUMNS, row, strict=True))


def _by_reason(refused: Mapping[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for item_id, reason in refused.items():
        grouped.setdefault(reason, []).append(item_id)
    return grouped
