"""Pending batches that stopped moving: what the reconciler re-publishes or fails, what
``embedq health`` counts and ``embedq job`` names (``overdue_batches``, ``count_overdue``), the
batches of workers that may be dead (``claimed_batches``), and a re-publish counted
(``mark_resent``).

Functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.models import Batch, BatchState


def _cutoff(older_than_s: float, now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)) - timedelta(seconds=older_than_s)


def overdue_batches(
    session: Session,
    older_than_s: float,
    job_id: str | None = None,
    limit: int = 100,
    now: datetime | None = None,
) -> Sequence[Batch]:
    """Pending batches with no progress (sent, started, retried, re-published) for longer than
    ``older_than_s`` seconds at ``now`` (default: the present), oldest first."""
    cutoff = _cutoff(older_than_s, now)
    query = select(Batch).where(Batch.state == BatchState.SENT, Batch.updated_at < cutoff)
    if job_id is not None:
        query = query.where(Batch.job_id == job_id)
    return session.scalars(query.order_by(Batch.updated_at).limit(limit)).all()


def count_overdue(
    session: Session, older_than_s: float, job_id: str | None = None, now: datetime | None = None
) -> int:
    """How many batches ``overdue_batches`` would list (of one job, or of all)."""
    cutoff = _cutoff(older_than_s, now)
    query = select(func.count()).where(Batch.state == BatchState.SENT, Batch.updated_at < cutoff)
    if job_id is not None:
        query = query.where(Batch.job_id == job_id)
    return int(session.scalar(query) or 0)


def mark_resent(session: Session, batch_id: int, note: str) -> None:
    """Count one more publish of a batch whose message was lost."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state == BatchState.SENT)
        .values(sends=Batch.sends + 1, last_error=note, updated_at=datetime.now(UTC))
    )


def claimed_batches(
    session: Session, older_than_s: float, limit: int = 500, now: datetime | None = None
) -> Sequence[Batch]:
    """Pending batches a worker process has claimed, with no progress for ``older_than_s``."""
    cutoff = _cutoff(older_than_s, now)
    query = select(Batch).where(
        Batch.state == BatchState.SENT, Batch.worker.is_not(None), Batch.updated_at < cutoff
    )
    return session.scalars(query.order_by(Batch.updated_at).limit(limit)).all()
