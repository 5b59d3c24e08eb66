"""``batch_stats``: each executed batch's timing, written once per batch (a redelivered batch
replaces its row), and read back as the rows timing reports are made of and the sums a
backfill's progress and summary show.

Functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, func, select
from sqlalchemy.orm import Session

from storage import dialect
from storage.models import BatchStat, Job, as_utc

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


def insert_batch_stats(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """``upsert_batch_stat`` for many batches in one executemany."""
    if not rows:
        return
    now = datetime.now(UTC)
    statement = dialect.prepared(session, "batch_stat", _upsert)
    session.connection().execute(statement, [{**row, "created_at": now} for row in rows])


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


BUSY_WINDOW_S = 60.0
"""The span ``embedq health`` and ``embedq_engine_busy_ratio`` measure a worker's busy ratio
over: the last minute."""


@dataclass(frozen=True)
class EngineBusy:
    """How much of a span one worker process's engine was busy: the share of wall time spent
    in ``encode`` (tokenising, running the model, pooling), not in SQL, the broker or Celery.
    A process that holds a GPU and shows a low ratio while work waits is starving."""

    host: str
    pid: int
    batches: int
    busy_s: float
    span_s: float

    @property
    def ratio(self) -> float:
        return min(1.0, self.busy_s / self.span_s) if self.span_s > 0 else 0.0


def engine_interval(created_at: datetime, engine_ms: float, write_ms: float) -> tuple[float, float]:
    """When a batch's engine ran, in epoch seconds: it ended where the write began (the row is
    stamped after the write) and lasted ``engine_ms``."""
    end = _epoch(created_at) - write_ms / 1000
    return end - engine_ms / 1000, end


def busy_seconds(intervals: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """The time inside [start, end] covered by any of ``intervals`` (overlaps counted once:
    batches that share one engine on threads overlap)."""
    total, reached = 0.0, start
    for low, high in sorted(intervals):
        low, high = max(low, reached), min(high, end)
        if high > low:
            total += high - low
            reached = high
    return total


def engine_busy(
    session: Session, until: datetime, window_s: float = BUSY_WINDOW_S, host: str | None = None
) -> list[EngineBusy]:
    """The busy ratio of each worker process (of ``host`` when given, as ``last_provider``
    matches it) over the ``window_s`` seconds before ``until``, from the batches it stored."""
    end = _epoch(until)
    start = end - window_s
    query = select(
        BatchStat.host,
        BatchStat.pid,
        BatchStat.created_at,
        BatchStat.tokenize_ms + BatchStat.inference_ms + BatchStat.pool_ms,
        BatchStat.write_ms,
    ).where(BatchStat.created_at >= datetime.fromtimestamp(start, UTC))
    if host is not None:
        query = query.where(
            (BatchStat.host == host) | BatchStat.host.startswith(f"{host}/", autoescape=True)
        )
    found: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for row_host, pid, created_at, engine_ms, write_ms in session.execute(query):
        found.setdefault((row_host, int(pid)), []).append(
            engine_interval(created_at, engine_ms, write_ms)
        )
    return [
        EngineBusy(h, p, len(spans), busy_seconds(spans, start, end), window_s)
        for (h, p), spans in sorted(found.items())
    ]


def _epoch(moment: datetime) -> float:
    """Epoch seconds of a stored time (SQLite gives it back without its UTC zone)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def recent_rate(session: Session, model: str, min_texts: int) -> tuple[str, int, float] | None:
    """The most recent job of ``model`` whose batches ran at least ``min_texts`` texts: its id,
    the tokens they ran, and the seconds from the first batch's start to the last one's end
    (all its worker processes together); ``None`` when there is none."""
    recent = session.execute(
        select(BatchStat.job_id)
        .join(Job, Job.id == BatchStat.job_id)
        .where(Job.model_name == model)
        .group_by(BatchStat.job_id)
        .having(func.sum(BatchStat.texts) >= min_texts)
        .order_by(func.max(BatchStat.created_at).desc())
        .limit(1)
    ).first()
    if recent is None:
        return None
    rows = session.execute(
        select(BatchStat.created_at, BatchStat.total_ms, BatchStat.tokens).where(
            BatchStat.job_id == recent.job_id
        )
    ).all()
    start = min(as_utc(row.created_at).timestamp() - row.total_ms / 1000 for row in rows)
    end = max(as_utc(row.created_at).timestamp() for row in rows)
    return str(recent.job_id), sum(row.tokens for row in rows), max(end - start, 1e-3)
