"""Queries, shaped as the tasks ask them. Functions take the session first and never commit:
the caller's session scope does.

Writes that a redelivered batch may repeat are dialect upserts (``INSERT .. ON CONFLICT``), so
at-least-once delivery never duplicates a row; SQLAlchemy has no dialect-neutral upsert, so the
statement is picked by the session's dialect here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Insert, case, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import (
    BatchStat,
    Embedding,
    Job,
    JobState,
    ModelSource,
    ModelState,
    PreparedModel,
)


def _insert(session: Session, table: Any) -> Insert:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"embedq stores on SQLite or PostgreSQL, not {dialect}")


def upsert_embeddings(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Insert embedding rows, skipping (job, item) pairs already stored; returns rows inserted."""
    if not rows:
        return 0
    insert: Any = _insert(session, Embedding).values(list(rows))
    # RETURNING yields only the rows this statement inserted (PostgreSQL; SQLite >= 3.35).
    statement = insert.on_conflict_do_nothing(index_elements=["job_id", "item_id"]).returning(
        Embedding.id
    )
    return len(session.execute(statement).all())


def count_embeddings(session: Session, job_id: str) -> int:
    return int(session.scalar(select(func.count()).where(Embedding.job_id == job_id)) or 0)


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def list_embeddings(session: Session, job_id: str) -> Sequence[Embedding]:
    """A job's embeddings in input order."""
    return session.scalars(
        select(Embedding).where(Embedding.job_id == job_id).order_by(Embedding.position)
    ).all()


def create_job(session: Session, job: Job) -> Job:
    session.add(job)
    return job


def upsert_batch_stat(session: Session, row: dict[str, Any]) -> None:
    """Store a batch's timing; a redelivered batch replaces its earlier row."""
    insert: Any = _insert(session, BatchStat).values(**row)
    update = {k: insert.excluded[k] for k in row if k not in ("job_id", "batch_index")}
    session.execute(
        insert.on_conflict_do_update(index_elements=["job_id", "batch_index"], set_=update)
    )


def add_progress(
    session: Session, job_id: str, *, done: int, failed: int, error: str | None
) -> bool:
    """Count items just stored or failed, and settle the job's state when none are left;
    true when this call finished the job.

    The increments are one UPDATE each, so concurrent batches of one job never lose a count;
    ``done`` must be the rows this batch really inserted, so a redelivery adds nothing.
    """
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "done_items": Job.done_items + done,
        "failed_items": Job.failed_items + failed,
        "started_at": func.coalesce(Job.started_at, now),
        "state": case((Job.state == JobState.QUEUED, JobState.RUNNING), else_=Job.state),
    }
    if error:
        values["error"] = func.coalesce(Job.error, error)
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    finished = Job.done_items + Job.failed_items >= Job.total_items
    settled = session.execute(
        update(Job)
        .where(Job.id == job_id, finished, Job.finished_at.is_(None))
        .values(
            finished_at=now,
            state=case(
                (Job.failed_items == 0, JobState.SUCCEEDED),
                (Job.done_items == 0, JobState.FAILED),
                else_=JobState.PARTIALLY_FAILED,
            ),
        )
    )
    return bool(getattr(settled, "rowcount", 0) == 1)


def list_jobs(session: Session, limit: int = 20) -> Sequence[Job]:
    """The most recent jobs, newest first."""
    return session.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit)).all()


def job_timing(session: Session, job_id: str) -> dict[str, float]:
    """A job's batch statistics summed: batches, texts, tokens and milliseconds per stage."""
    row = session.execute(
        select(
            func.count(BatchStat.id),
            func.coalesce(func.sum(BatchStat.texts), 0),
            func.coalesce(func.sum(BatchStat.tokens), 0),
            func.coalesce(func.sum(BatchStat.padded_tokens), 0),
            func.coalesce(func.avg(BatchStat.queue_wait_ms), 0.0),
            func.coalesce(func.sum(BatchStat.inference_ms), 0.0),
            func.coalesce(func.sum(BatchStat.total_ms), 0.0),
        ).where(BatchStat.job_id == job_id)
    ).one()
    keys = (
        "batches",
        "texts",
        "tokens",
        "padded_tokens",
        "mean_queue_wait_ms",
        "inference_ms",
        "total_ms",
    )
    return {key: float(value) for key, value in zip(keys, row, strict=True)}


def register_source(session: Session, name: str, source: str, options: dict[str, Any]) -> None:
    """Record where the fleet gets model ``name``, and forget earlier failures to prepare it so
    hosts try again with the new source."""
    insert: Any = _insert(session, ModelSource).values(name=name, source=source, options=options)
    session.execute(
        insert.on_conflict_do_update(
            index_elements=["name"],
            set_={"source": source, "options": options, "registered_at": datetime.now(UTC)},
        )
    )
    session.execute(
        delete(PreparedModel).where(
            PreparedModel.name == name, PreparedModel.state == ModelState.FAILED
        )
    )


def get_source(session: Session, name: str) -> ModelSource | None:
    return session.get(ModelSource, name)


def get_prepared(session: Session, name: str, host: str) -> PreparedModel | None:
    """What ``host`` has recorded about model ``name``: preparing, ready or failed."""
    return session.scalars(
        select(PreparedModel).where(PreparedModel.name == name, PreparedModel.host == host)
    ).first()


def set_prepared(session: Session, name: str, host: str, state: ModelState, **fields: Any) -> None:
    """Record ``host``'s state for model ``name`` (one row per pair, replaced each time)."""
    values = {"name": name, "host": host, "state": state, **fields}
    values.setdefault("error", None)
    insert: Any = _insert(session, PreparedModel).values(**values)
    update_ = {k: insert.excluded[k] for k in values if k not in ("name", "host")}
    update_["updated_at"] = datetime.now(UTC)
    session.execute(insert.on_conflict_do_update(index_elements=["name", "host"], set_=update_))


def list_prepared(session: Session) -> Sequence[PreparedModel]:
    return session.scalars(
        select(PreparedModel).order_by(PreparedModel.name, PreparedModel.host)
    ).all()
