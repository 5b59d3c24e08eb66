"""``batch_stats``: each executed batch's timing, written once per batch (a redelivered batch
replaces its row), and read back as the rows timing reports are made of and the sums a
backfill's progress and summary show.

Functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, func, select
from sqlalchemy.orm import Session

from storage import dialect
from storage.models import BatchStat, Job

STREAM_PAGE = 5000

FIELDS = (
    "host",
    "pid",
    "provider",
    "precision",
    "texts",
    "tokens",
    "padded_tokens",
    "queue_wait_ms",
    "tokenize_ms",
    "inference_ms",
    "pool_ms",
    "write_ms",
    "total_ms",
)
"""What a batch's timing row holds besides its job and batch index."""


def _upsert(session: Session) -> Any:
    insert: Any = dialect.upsert(session, BatchStat.__table__)
    return insert.on_conflict_do_update(
        index_elements=["job_id", "batch_index"],
        set_={field: insert.excluded[field] for field in FIELDS},
    )


def upsert_batch_stat(session: Session, row: dict[str, Any]) -> None:
    """Store a batch's timing (``job_id``, ``batch_index`` and every one of ``FIELDS``); a
    redelivered batch replaces its earlier row."""
    missing = {"job_id", "batch_index", *FIELDS} - set(row)
    if missing:
        raise ValueError(f"batch stat row lacks {sorted(missing)}")
    statement = dialect.prepared(session, "batch_stat", _upsert)
    session.connection().execute(statement, {**row, "created_at": datetime.now(UTC)})


def list_batch_stats(
    session: Session,
    fields: Sequence[str],
    *,
    after: datetime | None = None,
    model: str | None = None,
    job_id: str | None = None,
) -> Iterator[Row[*tuple[Any, ...]]]:
    """(model name, then ``fields`` of ``BatchStat``) of each batch created after ``after``,
    of ``model``, of ``job_id`` (each filter when given), oldest first; streamed in pages, so
    a long history is never held whole."""
    query = select(Job.model_name, *(getattr(BatchStat, field) for field in fields)).join(
        Job, Job.id == BatchStat.job_id
    )
    if after is not None:
        query = query.where(BatchStat.created_at >= after)
    if model is not None:
        query = query.where(Job.model_name == model)
    if job_id is not None:
        query = query.where(BatchStat.job_id == job_id)
    query = query.order_by(BatchStat.created_at).execution_options(yield_per=STREAM_PAGE)
    yield from session.execute(query)


def last_provider(session: Session, host: str) -> str | None:
    """The execution provider of the latest batch ``host`` ran (on any machine recorded under
    it: ``host`` or ``host/<machine>``, as containers sharing a host name are)."""
    return session.scalar(
        select(BatchStat.provider)
        .where((BatchStat.host == host) | BatchStat.host.startswith(f"{host}/", autoescape=True))
        .order_by(BatchStat.created_at.desc())
        .limit(1)
    )


def job_tokens(session: Session, job_id: str) -> int:
    """The tokens the batches of ``job_id`` have embedded so far."""
    total = session.scalar(
        select(func.coalesce(func.sum(BatchStat.tokens), 0)).where(BatchStat.job_id == job_id)
    )
    return int(total or 0)


def worker_shares(session: Session, job_id: str) -> list[tuple[str, int, int, int]]:
    """(host, pid, texts, batches) of each worker process that ran batches of ``job_id``,
    busiest first."""
    rows = session.execute(
        select(BatchStat.host, BatchStat.pid, func.sum(BatchStat.texts), func.count())
        .where(BatchStat.job_id == job_id)
        .group_by(BatchStat.host, BatchStat.pid)
        .order_by(func.sum(BatchStat.texts).desc())
    )
    return [(host, int(pid), int(texts), int(batches)) for host, pid, texts, batches in rows]
