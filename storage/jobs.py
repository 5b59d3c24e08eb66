"""Jobs: their rows, their counts and the state those counts settle into.

Functions take the session first and never commit: the caller's session scope does. A job's
status as a waiting client reads it (``job_status``) and as the batch that finishes the job
returns it (``settle_progress``) is read in Core: loading ORM objects cost more than the
queries themselves.

Stored items never take a job past ``total_items``: the counting UPDATE holds that in its WHERE
clause (no statement more), and a batch whose stored items it refuses raises
``OverfullJobError``, so the caller's transaction stores nothing of it (a message for a job that
had ended, or one its ledger cannot account for).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Integer,
    Row,
    Text,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session

from storage.models import BatchStat, FailureKind, Job, JobState

_jobs: Any = Job.__table__


class OverfullJobError(Exception):
    """Raised when the items a batch stored would count its job past ``total_items`` (the job
    had ended, or the batch is one its ledger cannot account for): nothing of the batch may be
    committed."""


_STATUS = select(
    _jobs.c.id,
    _jobs.c.state,
    _jobs.c.model_name,
    _jobs.c.total_items,
    _jobs.c.done_items,
    _jobs.c.failed_items,
    _jobs.c.error,
    _jobs.c.error_kind,
).where(_jobs.c.id == bindparam("job"))
_DONE = bindparam("done", type_=Integer)
_FAILED = bindparam("failed", type_=Integer)
_COUNTING = (
    update(_jobs)
    .where(
        or_(
            _jobs.c.sealed.is_not(true()),  # a backfill's job: its total is not known yet
            _DONE == 0,  # failures only: a failing batch always ends its items
            _jobs.c.done_items + _jobs.c.failed_items + _DONE + _FAILED <= _jobs.c.total_items,
        )
    )
    .values(
        done_items=_jobs.c.done_items + _DONE,
        failed_items=_jobs.c.failed_items + _FAILED,
        started_at=func.coalesce(
            _jobs.c.started_at, bindparam("now", type_=DateTime(timezone=True))
        ),
        state=case(
            (_jobs.c.state == JobState.QUEUED.value, JobState.RUNNING.value),
            else_=_jobs.c.state,
        ),
        error=func.coalesce(_jobs.c.error, bindparam("error", type_=Text)),
        # The kind of the error kept: both are set by the first call that brings an error.
        error_kind=case(
            (_jobs.c.error.is_(None), bindparam("kind", type_=Text)), else_=_jobs.c.error_kind
        ),
    )
)
"""A job's counts after a batch, stored items never past its total: of one job, or of many that
add the same counts."""
_COUNT = _COUNTING.where(_jobs.c.id == bindparam("job"))
_COUNT_MANY = _COUNTING.where(_jobs.c.id.in_(bindparam("jobs", expanding=True)))
_SETTLING = (
    update(_jobs)
    .where(
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
"""A job whose items have all ended gets its final state, once; of one job, or of many."""
_SETTLE = _SETTLING.where(_jobs.c.id == bindparam("job"))
_SETTLE_MANY = _SETTLING.where(_jobs.c.id.in_(bindparam("jobs", expanding=True)))


def create_job(session: Session, job: Job) -> Job:
    session.add(job)
    session.flush()  # its batches refer to it
    return job


_NEW_JOB = ("id", "model_name", "queue", "tag", "total_items", "meta")


def create_jobs(session: Session, new: Sequence[Job]) -> None:
    """Insert jobs in one statement, as rows, not through the session's unit of work (which
    cost the producer's gatherer 0.3 ms a job): the jobs are not read back in this session."""
    rows = [{key: getattr(job, key) for key in _NEW_JOB} for job in new]
    session.connection().execute(insert(Job), rows)


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def job_status(session: Session, job_id: str) -> Row[*tuple[Any, ...]] | None:
    """A job's id, state, model_name, total/done/failed items, error and error_kind (no ORM
    object)."""
    return session.connection().execute(_STATUS, {"job": job_id}).first()


def list_jobs(session: Session, limit: int = 20) -> Sequence[Job]:
    """The most recent jobs, newest first."""
    return session.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit)).all()


def add_progress(
    session: Session,
    job_id: str,
    *,
    done: int,
    failed: int,
    error: str | None,
    kind: FailureKind | None = None,
) -> bool:
    """Count items just stored or failed, and settle the job's state when none are left;
    true when this call finished the job.

    The increments are one UPDATE each, so concurrent batches of one job never lose a count;
    ``done`` must be the rows this batch really inserted, so a redelivery adds nothing. The
    first error recorded is kept, with its ``kind``. Raises ``OverfullJobError`` when the items
    stored (``done``) would count the job past its total.
    """
    settled = settle_progress(session, job_id, done=done, failed=failed, error=error, kind=kind)
    return settled is not None


def settle_progress(
    session: Session,
    job_id: str,
    *,
    done: int,
    failed: int,
    error: str | None,
    kind: FailureKind | None = None,
) -> Row[*tuple[Any, ...]] | None:
    """``add_progress`` that returns the job's final status (as ``job_status`` reads it) when
    this call finished the job, else ``None``: what its completion signal can carry."""
    now = datetime.now(UTC)
    connection = session.connection()
    params = {
        "job": job_id,
        "done": done,
        "failed": failed,
        "now": now,
        "error": error,
        "kind": None if error is None or kind is None else kind.value,
    }
    if connection.execute(_COUNT, params).rowcount == 0 and done:
        raise OverfullJobError(f"job {job_id} has no room for {done} more items")
    return connection.execute(_SETTLE, {"job": job_id, "now": now}).first()


def settle_many(session: Session, done: dict[str, int]) -> dict[str, Row[*tuple[Any, ...]]]:
    """``settle_progress`` for many jobs at once, items stored only (no failures): ``done``
    gives each job's newly stored items. One statement per distinct count (jobs that add the
    same number share one), then the settling with RETURNING; returns the final status of each job
    this call finished, by job id."""
    if not done:
        return {}
    now = datetime.now(UTC)
    connection = session.connection()
    by_count: dict[int, list[str]] = {}  # one-text jobs all add 1: one statement for them
    for job, n in done.items():
        by_count.setdefault(n, []).append(job)
    for n, same in by_count.items():
        counted = connection.execute(
            _COUNT_MANY,
            {"jobs": same, "done": n, "failed": 0, "now": now, "error": None, "kind": None},
        ).rowcount
        if n and counted < len(same):
            raise OverfullJobError(f"a job of {same} has no room for {n} more items")
    settled = connection.execute(_SETTLE_MANY, {"jobs": list(done), "now": now}).all()
    return {str(row.id): row for row in settled}


def fail_rest(session: Session, job_id: str, reason: str, kind: FailureKind) -> bool:
    """Count every item of a sealed job that is not done as failed (when which items a broken
    batch carried cannot be told, the job cannot complete otherwise) and settle it; true when
    this call finished the job."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.sealed.is_(true()), Job.finished_at.is_(None))
        .values(failed_items=Job.total_items - Job.done_items)
    )
    return add_progress(session, job_id, done=0, failed=0, error=reason, kind=kind)


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
