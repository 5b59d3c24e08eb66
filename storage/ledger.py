"""The batch ledger: every batch of every job, from the producer's commit to its end.

A producer writes a job's batch rows in the job's own transaction, before it publishes a single
message, so the store knows what is pending even when the broker forgets. A worker *claims* a
batch before running it (attempts + 1, who, when) and ends it in the transaction that stores its
vectors (or its failures), clearing the texts it kept for a re-publish. The reconciler reads the
rows that stopped moving (``storage.stalled``) and re-publishes or fails them under a lease;
``storage.batch_failures`` ends batches failed.

Functions take the session first and never commit. The statements a batch
runs on the hot path are built once and executed with parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Text,
    bindparam,
    func,
    insert,
    literal_column,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage import vector_index
from storage.models import Batch, BatchState, CollectionVersion, Job
from storage.session import commit_without_flush

_batches: Any = Batch.__table__
_jobs: Any = Job.__table__
_versions: Any = CollectionVersion.__table__
NOW = bindparam("now", type_=DateTime(timezone=True))
"""The statements' ``now`` parameter."""


@dataclass(frozen=True)
class NewBatch:
    """A batch as its producer records it: its index in the job, its items, its texts."""

    index: int
    item_ids: list[str]
    texts: list[str]
    positions: list[int]


@dataclass(frozen=True)
class JobFacts:
    """What a claim reads of a batch's job, to check its message against."""

    total: int | None
    """The item count once known (sealed), to check positions against; else ``None``."""
    model: str
    """The model the job names: a message naming another is refused."""
    finished: bool
    """The job had ended: a message adds nothing to it."""


@dataclass(frozen=True)
class Claim:
    """What a worker learns when it claims a batch."""

    state: BatchState | None
    """The batch's state before the claim (``None``: no ledger row, e.g. a raw message)."""
    claimed: bool
    """True when the batch was pending and is now this worker's to run."""
    recorded: list[str] | None
    """The items the ledger's row says the batch carries (``None``: no row)."""
    job: JobFacts | None
    """``None``: the store has no such job."""


def kept(batch: Batch) -> NewBatch | None:
    """What the ledger keeps of a pending batch to publish it again (its items, texts and
    positions), or ``None`` when it keeps no texts (sent without embedq's producer)."""
    payload: dict[str, Any] = batch.payload or {}
    texts = list(payload.get("texts") or [])
    if not texts:
        return None
    positions = list(payload.get("positions") or [])
    return NewBatch(batch.batch_index, list(batch.item_ids), texts, positions)


def add_batches(session: Session, job_id: str, batches: Sequence[NewBatch]) -> None:
    """Record a job's batches as sent, with what a re-publish needs."""
    add_batches_of(session, [(job_id, batch) for batch in batches])


def add_batches_of(session: Session, batches: Sequence[tuple[str, NewBatch]]) -> None:
    """Record batches of several jobs (job id, batch) as sent, in one statement."""
    if not batches:
        return
    now = datetime.now(UTC)
    rows = [
        {
            "job_id": job_id,
            "batch_index": batch.index,
            "state": BatchState.SENT.value,
            "item_count": len(batch.item_ids),
            "item_ids": batch.item_ids,
            "payload": {"texts": batch.texts, "positions": batch.positions},
            "attempts": 0,
            "sends": 1,
            "sent_at": now,
            "updated_at": now,
        }
        for job_id, batch in batches
    ]
    session.connection().execute(insert(_batches), rows)


_CLAIM = (
    update(_batches)
    .where(
        _batches.c.job_id == bindparam("job"),
        _batches.c.batch_index == bindparam("index"),
        _batches.c.state == BatchState.SENT.value,
    )
    .values(attempts=_batches.c.attempts + 1, worker=bindparam("worker"), updated_at=NOW)
    .returning(_batches.c.item_ids)
)
_STATE = select(_batches.c.state, _batches.c.item_ids).where(
    _batches.c.job_id == bindparam("job"), _batches.c.batch_index == bindparam("index")
)
_FACT_COLUMNS = (
    _jobs.c.total_items,
    _jobs.c.sealed,
    _jobs.c.model_name,
    _jobs.c.finished_at,
    _versions.c.index_table,
)
_WITH_VERSION = _jobs.outerjoin(_versions, _versions.c.job_id == _jobs.c.id)
_JOB = select(*_FACT_COLUMNS).select_from(_WITH_VERSION).where(_jobs.c.id == bindparam("job"))


def _facts(job_id: str, row: Any) -> JobFacts:
    """The facts of ``job_id``'s row; whether its vectors go to a vector index is remembered
    for its write (``vector_index.remember``), which then asks the store nothing more."""
    total, sealed, model, finished_at, index_table = row[-5:]
    vector_index.remember(job_id, index_table is not None)
    return JobFacts(int(total) if sealed else None, str(model), finished_at is not None)


def claim(session: Session, job_id: str, index: int, worker: str) -> Claim:
    """Take a pending batch for ``worker``: count the attempt and record who runs it.

    A batch that already ended (done, failed) is not claimed: a redelivered message is then
    skipped without running the model. The claim reads what the message is checked against
    (the items the ledger recorded, by the claim's RETURNING; the job's facts) with no statement
    more. The claim is not worth an fsync: on PostgreSQL it commits asynchronously (a crash may
    forget an attempt, never a result).
    """
    commit_without_flush(session)
    connection = session.connection()
    params = {"job": job_id, "index": index, "worker": worker, "now": datetime.now(UTC)}
    row = connection.execute(_CLAIM, params).first()
    claimed = row is not None
    if not claimed:  # ended, or not in the ledger
        row = connection.execute(_STATE, params).first()
    state = BatchState.SENT if claimed else None if row is None else BatchState(row.state)
    recorded = None if row is None else list(row.item_ids)
    job = connection.execute(_JOB, params).first()
    return Claim(state, claimed, recorded, None if job is None else _facts(job_id, job))


def adopt(session: Session, job_id: str, index: int, item_ids: Sequence[str], worker: str) -> bool:
    """Record a batch that arrived without a ledger row (sent by an application that wrote only
    the job), claimed by ``worker``; its texts are in its message, not here. False when another
    delivery recorded the batch first (nothing written: claim it again to see what it holds)."""
    now = datetime.now(UTC)
    try:
        with session.begin_nested():
            insert_batch(session, job_id, index, item_ids, worker, BatchState.SENT, now)
    except IntegrityError:  # the (job, batch_index) key: another delivery's row
        return False
    return True


def insert_batch(
    session: Session,
    job_id: str,
    index: int,
    item_ids: Sequence[str],
    worker: str | None,
    state: BatchState,
    now: datetime,
    error: str | None = None,
) -> None:
    session.connection().execute(
        insert(_batches),
        {
            "job_id": job_id,
            "batch_index": index,
            "state": state.value,
            "item_count": len(item_ids),
            "item_ids": list(item_ids),
            "payload": None,
            "attempts": 1,
            "sends": 1,
            "worker": worker,
            "sent_at": now,
            "updated_at": now,
            "finished_at": None if state is BatchState.SENT else now,
            "last_error": error,
        },
    )


_FINISH = (
    update(_batches)
    .where(
        _batches.c.job_id == bindparam("job"),
        _batches.c.batch_index == bindparam("index"),
        _batches.c.state == BatchState.SENT.value,
    )
    .values(
        state=bindparam("state"),
        payload=None,
        finished_at=NOW,
        updated_at=NOW,
        last_error=func.coalesce(bindparam("error", type_=Text), _batches.c.last_error),
    )
)


_KEY = tuple_(_batches.c.job_id, _batches.c.batch_index)
_STILL_SENT = _batches.c.state.concat(literal_column("''")) == BatchState.SENT.value
"""``state = 'sent'`` for the statements that find batches by many keys, kept off the state
index (``|| ''``, the idiom both stores document for this): a planner whose statistics predate
a backlog (a fresh table, thousands of batches sent since the last ANALYZE) takes that index
for a few rows and reads every pending batch on each claim and end (measured: 8-11 ms a
statement under 3,000 pending one-text jobs, 0.5 ms by the key's unique index)."""
_FINISH_MANY = (
    update(_batches)
    .where(_KEY.in_(bindparam("keys", expanding=True)), _STILL_SENT)
    .values(state=BatchState.DONE.value, payload=None, finished_at=NOW, updated_at=NOW)
    .returning(_batches.c.job_id, _batches.c.batch_index)
)
_CLAIM_MANY = (
    update(_batches)
    .where(_KEY.in_(bindparam("keys", expanding=True)), _STILL_SENT)
    .values(attempts=_batches.c.attempts + 1, worker=bindparam("worker"), updated_at=NOW)
    .returning(_batches.c.job_id, _batches.c.batch_index, _batches.c.item_ids)
)
_FACTS = (
    select(_jobs.c.id, *_FACT_COLUMNS)
    .select_from(_WITH_VERSION)
    .where(_jobs.c.id.in_(bindparam("jobs", expanding=True)))
)

BatchKey = tuple[str, int]
"""A batch: its job's id and its index in the job."""


def finish_done(session: Session, keys: Sequence[BatchKey]) -> set[BatchKey]:
    """End many pending batches as done in one statement; returns those this call ended."""
    if not keys:
        return set()
    params = {"keys": list(keys), "now": datetime.now(UTC)}
    return {(row[0], int(row[1])) for row in session.connection().execute(_FINISH_MANY, params)}


def claim_many(
    session: Session, keys: Sequence[BatchKey], worker: str
) -> tuple[dict[BatchKey, list[str]], dict[str, JobFacts]]:
    """``claim`` for many batches in two statements: the batches this call claimed, each with
    the items the ledger recorded for it (the others had ended, or have no ledger row), and
    what the claim read of each of their jobs."""
    if not keys:
        return {}, {}
    commit_without_flush(session)
    connection = session.connection()
    params = {"keys": list(keys), "worker": worker, "now": datetime.now(UTC)}
    claimed = {
        (row[0], int(row[1])): list(row[2]) for row in connection.execute(_CLAIM_MANY, params)
    }
    jobs_of = sorted({job for job, _ in claimed})
    facts = (
        {
            str(row[0]): _facts(str(row[0]), row)
            for row in connection.execute(_FACTS, {"jobs": jobs_of})
        }
        if jobs_of
        else {}
    )
    return claimed, facts


def finish(
    session: Session, job_id: str, index: int, state: BatchState, error: str | None = None
) -> bool:
    """End a pending batch as done or failed (``error`` says why); true when this call ended it."""
    params = {
        "job": job_id,
        "index": index,
        "state": state.value,
        "now": datetime.now(UTC),
        "error": error,
    }
    return bool(session.connection().execute(_FINISH, params).rowcount == 1)


def note_error(session: Session, job_id: str, index: int, error: str) -> None:
    """Record why a pending batch's last try failed (it will be tried again)."""
    session.execute(
        update(Batch)
        .where(Batch.job_id == job_id, Batch.batch_index == index, Batch.state == BatchState.SENT)
        .values(last_error=error, updated_at=datetime.now(UTC))
    )


def batch_state(session: Session, job_id: str, index: int) -> BatchState | None:
    """The batch's state, or ``None`` when the ledger has no such batch."""
    found = session.connection().execute(_STATE, {"job": job_id, "index": index}).first()
    return None if found is None else BatchState(found.state)


def get_batch(session: Session, job_id: str, index: int) -> Batch | None:
    return session.scalars(
        select(Batch).where(Batch.job_id == job_id, Batch.batch_index == index)
    ).first()


def pending_batches(session: Session, job_id: str) -> Sequence[Batch]:
    """A job's batches that have not ended."""
    return session.scalars(
        select(Batch)
        .where(Batch.job_id == job_id, Batch.state == BatchState.SENT)
        .order_by(Batch.batch_index)
    ).all()


def pending_indexes(session: Session, job_id: str) -> set[int]:
    """The indexes of a job's batches that have not ended (no payloads loaded)."""
    return set(
        session.scalars(
            select(Batch.batch_index).where(Batch.job_id == job_id, Batch.state == BatchState.SENT)
        )
    )


def count_pending(session: Session, job_id: str) -> int:
    return int(
        session.scalar(
            select(func.count()).where(Batch.job_id == job_id, Batch.state == BatchState.SENT)
        )
        or 0
    )


def job_batches(session: Session, job_id: str) -> dict[str, int]:
    """A job's batches counted by state, e.g. ``{"done": 10, "sent": 3}``."""
    rows = session.execute(
        select(Batch.state, func.count()).where(Batch.job_id == job_id).group_by(Batch.state)
    ).all()
    return {str(state): int(count) for state, count in rows}


def next_index(session: Session, job_id: str) -> int:
    """The index a new batch of ``job_id`` gets."""
    last = session.scalar(select(func.max(Batch.batch_index)).where(Batch.job_id == job_id))
    return 0 if last is None else int(last) + 1
