"""Queries, shaped as the tasks ask them. Functions take the session first and never commit:
the caller's session scope does.

Writes that a redelivered batch may repeat are dialect upserts (``INSERT .. ON CONFLICT``), so
at-least-once delivery never duplicates a row; SQLAlchemy has no dialect-neutral upsert, so the
statement is picked by the session's dialect here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Insert,
    Row,
    Text,
    bindparam,
    case,
    delete,
    func,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import (
    BatchStat,
    CachedVector,
    Embedding,
    FailedItem,
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


# The statements every batch runs are built once per dialect and executed with parameters:
# building them per call (and a multi-row VALUES that compiles anew for each batch size) cost
# about as much as embedding one short text.
_built: dict[tuple[str, str], Any] = {}


def _prepared(session: Session, name: str, build: Callable[[Session], Any]) -> Any:
    key = (session.get_bind().dialect.name, name)
    if key not in _built:
        _built[key] = build(session)
    return _built[key]


def _embeddings_upsert(session: Session) -> Any:
    table: Any = Embedding.__table__
    insert: Any = _insert(session, table)
    # RETURNING yields only the rows this statement inserted (PostgreSQL; SQLite >= 3.35).
    return insert.on_conflict_do_nothing(index_elements=["job_id", "item_id"]).returning(
        table.c.id, table.c.text_sha256
    )


def upsert_embeddings(session: Session, rows: Sequence[dict[str, Any]]) -> list[tuple[int, str]]:
    """Insert embedding rows, skipping (job, item) pairs already stored; returns the (id, text
    sha256) of the rows inserted."""
    if not rows:
        return []
    statement = _prepared(session, "embeddings", _embeddings_upsert)
    return [(row[0], row[1]) for row in session.connection().execute(statement, list(rows))]


def _cache_insert(session: Session) -> Any:
    insert: Any = _insert(session, CachedVector.__table__)
    return insert.on_conflict_do_nothing(index_elements=["model_name", "text_sha256"])


def cache_vectors(session: Session, model: str, stored: Sequence[tuple[int, str]]) -> None:
    """Remember the first vector of each text under ``model`` (the content cache)."""
    if stored:
        rows = [{"model_name": model, "text_sha256": h, "embedding_id": i} for i, h in stored]
        session.connection().execute(_prepared(session, "cache", _cache_insert), rows)


def cached_vectors(session: Session, model: str, hashes: Sequence[str]) -> dict[str, Embedding]:
    """Stored embeddings of these texts under ``model``, by text sha256."""
    if not hashes:
        return {}
    rows = session.execute(
        select(CachedVector.text_sha256, Embedding)
        .join(Embedding, Embedding.id == CachedVector.embedding_id)
        .where(CachedVector.model_name == model, CachedVector.text_sha256.in_(set(hashes)))
    ).all()
    return {sha: embedding for sha, embedding in rows}


def _failure_insert(session: Session) -> Any:
    insert: Any = _insert(session, FailedItem.__table__)
    return insert.on_conflict_do_nothing(index_elements=["job_id", "item_id"]).returning(
        FailedItem.__table__.c.id
    )


def record_failures(session: Session, job_id: str, item_ids: Sequence[str], reason: str) -> int:
    """Record items of ``job_id`` as failed for ``reason``; returns how many were not already
    recorded (so a redelivered failing batch counts its items once)."""
    if not item_ids:
        return 0
    now = datetime.now(UTC)
    rows = [{"job_id": job_id, "item_id": i, "reason": reason, "created_at": now} for i in item_ids]
    statement = _prepared(session, "failure", _failure_insert)
    return len(session.connection().execute(statement, rows).all())


def count_embeddings(session: Session, job_id: str) -> int:
    return int(session.scalar(select(func.count()).where(Embedding.job_id == job_id)) or 0)


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


_embeddings_table: Any = Embedding.__table__
_VECTORS = (  # a client's read back, in Core for the same reason as _STATUS below
    select(_embeddings_table.c.item_id, _embeddings_table.c.vector)
    .where(_embeddings_table.c.job_id == bindparam("job"))
    .order_by(_embeddings_table.c.position)
)


def job_status(session: Session, job_id: str) -> Row[*tuple[Any, ...]] | None:
    """A job's id, state, model_name, total/done/failed items and error (no ORM object)."""
    return session.connection().execute(_STATUS, {"job": job_id}).first()


def list_vectors(session: Session, job_id: str) -> Sequence[Row[Any]]:
    """A job's (item_id, vector bytes) in input order (no ORM objects)."""
    return session.connection().execute(_VECTORS, {"job": job_id}).all()


def list_embeddings(session: Session, job_id: str) -> Sequence[Embedding]:
    """A job's embeddings in input order."""
    return session.scalars(
        select(Embedding).where(Embedding.job_id == job_id).order_by(Embedding.position)
    ).all()


def create_job(session: Session, job: Job) -> Job:
    session.add(job)
    session.flush()  # its batches refer to it
    return job


BATCH_STAT_FIELDS = (
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


def _batch_stat_upsert(session: Session) -> Any:
    insert: Any = _insert(session, BatchStat.__table__)
    return insert.on_conflict_do_update(
        index_elements=["job_id", "batch_index"],
        set_={field: insert.excluded[field] for field in BATCH_STAT_FIELDS},
    )


def upsert_batch_stat(session: Session, row: dict[str, Any]) -> None:
    """Store a batch's timing (``job_id``, ``batch_index`` and every ``BATCH_STAT_FIELDS``); a
    redelivered batch replaces its earlier row."""
    missing = {"job_id", "batch_index", *BATCH_STAT_FIELDS} - set(row)
    if missing:
        raise ValueError(f"batch stat row lacks {sorted(missing)}")
    statement = _prepared(session, "batch_stat", _batch_stat_upsert)
    session.connection().execute(statement, {**row, "created_at": datetime.now(UTC)})


# A job's status as a waiting client reads it (``job_status``) and as the batch that finishes
# the job returns it (``settle_progress``), in Core: loading ORM objects cost more than the
# queries themselves.
_jobs: Any = Job.__table__
_STATUS = select(
    _jobs.c.id,
    _jobs.c.state,
    _jobs.c.model_name,
    _jobs.c.total_items,
    _jobs.c.done_items,
    _jobs.c.failed_items,
    _jobs.c.error,
).where(_jobs.c.id == bindparam("job"))
_COUNT = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("job"))
    .values(
        done_items=_jobs.c.done_items + bindparam("done"),
        failed_items=_jobs.c.failed_items + bindparam("failed"),
        started_at=func.coalesce(
            _jobs.c.started_at, bindparam("now", type_=DateTime(timezone=True))
        ),
        state=case(
            (_jobs.c.state == JobState.QUEUED.value, JobState.RUNNING.value),
            else_=_jobs.c.state,
        ),
        error=func.coalesce(_jobs.c.error, bindparam("error", type_=Text)),
    )
)
_SETTLE = (
    update(_jobs)
    .where(
        _jobs.c.id == bindparam("job"),
        _jobs.c.done_items + _jobs.c.failed_items >= _jobs.c.total_items,
        _jobs.c.finished_at.is_(None),
        _jobs.c.sealed.is_(true()),
    )
    .values(
        finished_at=bindparam("now", type_=DateTime(timezone=True)),
        state=case(
            (_jobs.c.failed_items == 0, JobState.SUCCEEDED.value),
            (_jobs.c.done_items == 0, JobState.FAILED.value),
            else_=JobState.PARTIALLY_FAILED.value,
        ),
    )
    .returning(*_STATUS.selected_columns)
)


def add_progress(
    session: Session, job_id: str, *, done: int, failed: int, error: str | None
) -> bool:
    """Count items just stored or failed, and settle the job's state when none are left;
    true when this call finished the job.

    The increments are one UPDATE each, so concurrent batches of one job never lose a count;
    ``done`` must be the rows this batch really inserted, so a redelivery adds nothing. The
    first error recorded is kept.
    """
    return settle_progress(session, job_id, done=done, failed=failed, error=error) is not None


def settle_progress(
    session: Session, job_id: str, *, done: int, failed: int, error: str | None
) -> Row[*tuple[Any, ...]] | None:
    """``add_progress`` that returns the job's final status (as ``job_status`` reads it) when
    this call finished the job, else ``None``: what its completion signal can carry."""
    now = datetime.now(UTC)
    connection = session.connection()
    params = {"job": job_id, "done": done, "failed": failed, "now": now, "error": error}
    connection.execute(_COUNT, params)
    return connection.execute(_SETTLE, {"job": job_id, "now": now}).first()


def fail_rest(session: Session, job_id: str, reason: str) -> bool:
    """Count every item of a sealed job that is not done as failed (when which items a broken
    batch carried cannot be told, the job cannot complete otherwise) and settle it; true when
    this call finished the job."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.sealed.is_(true()), Job.finished_at.is_(None))
        .values(failed_items=Job.total_items - Job.done_items)
    )
    return add_progress(session, job_id, done=0, failed=0, error=reason)


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


def list_ready_models(session: Session, host: str) -> list[str]:
    """The models ``host`` has prepared and can run, by name."""
    return list(
        session.scalars(
            select(PreparedModel.name).where(
                PreparedModel.host == host, PreparedModel.state == ModelState.READY
            )
        )
    )


def list_sources(session: Session) -> Sequence[ModelSource]:
    """The models registered for the fleet to prepare on demand, by name."""
    return session.scalars(select(ModelSource).order_by(ModelSource.name)).all()


def vectors_with_tokens(session: Session, job_id: str) -> Sequence[Row[str, bytes, int]]:
    """A job's (item_id, vector bytes, token_count) in input order: the API answers vectors
    with the tokens really counted for them."""
    return session.execute(
        select(Embedding.item_id, Embedding.vector, Embedding.token_count)
        .where(Embedding.job_id == job_id)
        .order_by(Embedding.position)
    ).all()


def ping(session: Session) -> None:
    """One round trip to the store (raises when it cannot be reached)."""
    session.execute(select(1))
