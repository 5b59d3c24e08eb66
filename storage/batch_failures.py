"""Batches and jobs ended failed: a batch's items recorded failed with the reason and its kind
and counted in the job (``fail_batch``, ``fail_items``), every pending batch of a job
(``fail_pending``), the rest of a job (``fail_job``, ``close_job``), and a message refused for a
job that had ended (``refuse``). The ledger (``storage.ledger``) says which batches are pending;
this module ends them.

Functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Text, bindparam, update
from sqlalchemy.orm import Session

from storage import failed_items, jobs, ledger
from storage.models import Batch, BatchState, FailureKind

_batches: Any = Batch.__table__


def fail_batch(
    session: Session,
    job_id: str,
    index: int,
    item_ids: Sequence[str],
    reason: str,
    kind: FailureKind,
) -> tuple[int, bool]:
    """End a batch as failed: its items recorded failed with ``reason`` of ``kind`` (once,
    however often this is called) and counted in the job. A batch that already ended (another
    delivery stored it) is left as it is. Returns (items newly failed, whether this finished
    the job)."""
    ended = ledger.finish(session, job_id, index, BatchState.FAILED, reason)
    if not ended and ledger.batch_state(session, job_id, index) is not None:
        return 0, False
    return fail_items(session, job_id, item_ids, reason, kind)


def fail_items(
    session: Session, job_id: str, item_ids: Sequence[str], reason: str, kind: FailureKind
) -> tuple[int, bool]:
    """Record items as failed with ``reason`` (once each) and count them in the job, leaving
    the ledger as it is (for items no batch of the ledger carries). Returns (items newly
    failed, whether this finished the job)."""
    failed = failed_items.record_failures(session, job_id, item_ids, reason, kind)
    finished = jobs.add_progress(session, job_id, done=0, failed=failed, error=reason, kind=kind)
    return failed, finished


def fail_pending(session: Session, job_id: str, reason: str, kind: FailureKind) -> bool:
    """Fail every batch of ``job_id`` that has not ended; true when this finished the job."""
    finished = False
    for batch in ledger.pending_batches(session, job_id):
        finished |= fail_batch(session, job_id, batch.batch_index, batch.item_ids, reason, kind)[1]
    return finished


def fail_job(session: Session, job_id: str, reason: str, kind: FailureKind) -> bool:
    """End the rest of a job for ``reason``: its pending batches fail, and every item not done
    counts failed (which items a broken message carried cannot be told: the job cannot complete
    otherwise); true when this call finished the job."""
    finished = fail_pending(session, job_id, reason, kind)
    return jobs.fail_rest(session, job_id, reason, kind) or finished


_CLOSE = (
    update(_batches)
    .where(_batches.c.job_id == bindparam("job"), _batches.c.state == BatchState.SENT.value)
    .values(
        state=BatchState.FAILED.value,
        payload=None,
        finished_at=ledger.NOW,
        updated_at=ledger.NOW,
        last_error=bindparam("error", type_=Text),
    )
)


def close_job(session: Session, job_id: str, reason: str, kind: FailureKind) -> bool:
    """``fail_job`` for a job with no room for its own pending batches (a message its ledger
    did not know took their places): they end failed with ``reason``, their items not recorded
    failed one by one (the job's count is full), and every item not done counts failed; true
    when this call finished the job."""
    params = {"job": job_id, "error": reason, "now": datetime.now(UTC)}
    session.connection().execute(_CLOSE, params)
    return jobs.fail_rest(session, job_id, reason, kind)


_REFUSED = (
    update(_batches)
    .where(_batches.c.job_id == bindparam("job"), _batches.c.batch_index == bindparam("index"))
    .values(last_error=bindparam("error", type_=Text), updated_at=ledger.NOW)
)


def refuse(session: Session, job_id: str, index: int, item_ids: Sequence[str], reason: str) -> None:
    """Record why a message for a job that had ended was refused, counting nothing in the job:
    its batch ends failed with ``reason`` (a new row when the ledger had none); a batch that
    had ended keeps its state and takes the reason as its last error."""
    now = datetime.now(UTC)
    if ledger.finish(session, job_id, index, BatchState.FAILED, reason):
        return
    params = {"job": job_id, "index": index, "error": reason, "now": now}
    if session.connection().execute(_REFUSED, params).rowcount == 0:
        ledger.insert_batch(session, job_id, index, item_ids, None, BatchState.FAILED, now, reason)
