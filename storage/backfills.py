"""Queries of a backfill run: its row and its job, what the store already holds of a chunk of
source rows (and with which text), what a sync forgets (changed texts, ids gone from the
source), the counts a run adds to its job, and what its summary reports.

Functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from storage import collections, vector_index
from storage.models import Backfill, Embedding, FailedItem, Job, JobState


def get_backfill(session: Session, name: str) -> Backfill | None:
    return session.get(Backfill, name)


def _new_job(session: Session, name: str, job_id: str, model: str, queue: str, source: str) -> None:
    session.add(
        Job(
            id=job_id,
            model_name=model,
            queue=queue,
            tag=name,
            total_items=0,
            sealed=False,
            meta={"backfill": name, "source": source},
        )
    )
    session.flush()  # the backfill and the version refer to it


def create_version(
    session: Session,
    name: str,
    *,
    job_id: str,
    model: str,
    queue: str,
    source: str,
    options: dict[str, Any],
    model_sha256: str | None = None,
    indexed: bool = True,
) -> int:
    """A new version of collection ``name`` and its job (unsealed, empty, tagged with the name),
    counting the run. A new name makes the backfill, whose first version readers get; another
    version is built beside the current one, which readers keep. ``indexed``: it keeps a vector
    index where the store can. Returns its number."""
    _new_job(session, name, job_id, model, queue, source)
    backfill = session.get(Backfill, name)
    if backfill is None:
        backfill = Backfill(
            name=name, job_id=job_id, model_name=model, source=source, options=options, runs=0
        )
        session.add(backfill)
        session.flush()  # its first version refers to it
    backfill.runs += 1
    backfill.source = source
    backfill.options = options
    return collections.add_version(session, name, job_id, model, model_sha256, indexed).version


def resume_backfill(
    session: Session,
    name: str,
    *,
    job_id: str,
    source: str,
    options: dict[str, Any],
) -> None:
    """Count one more run of ``backfill`` with these options, and unseal the job of the version
    it syncs (``job_id``) so the run can add items (the job settles again when the run seals
    it)."""
    backfill = session.get(Backfill, name)
    if backfill is None:
        raise LookupError(f"no backfill {name!r}")
    backfill.runs += 1
    backfill.source = source
    backfill.options = options
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(sealed=False, finished_at=None, state=JobState.RUNNING)
    )


def job_of(session: Session, job_or_name: str) -> str | None:
    """The job id of backfill ``job_or_name``, or ``job_or_name`` itself when it is a job;
    ``None`` when it is neither."""
    found = session.get(Backfill, job_or_name)
    if found is not None:
        return found.job_id
    return job_or_name if session.get(Job, job_or_name) is not None else None


def forget_failures(session: Session, job_id: str) -> int:
    """Delete the failed items of ``job_id`` and uncount them (``--retry-failed``); returns
    how many were forgotten."""
    result: Any = session.execute(delete(FailedItem).where(FailedItem.job_id == job_id))
    forgotten = int(result.rowcount)
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(failed_items=Job.failed_items - forgotten, error=None, error_kind=None)
    )
    return forgotten


def highest_row_ids(session: Session) -> tuple[int, int]:
    """The highest embedding and failed-item row ids: a row above them was written later."""
    embedding = session.scalar(select(func.coalesce(func.max(Embedding.id), 0)))
    failure = session.scalar(select(func.coalesce(func.max(FailedItem.id), 0)))
    return int(embedding or 0), int(failure or 0)


def stored_items(
    session: Session, job_id: str, item_ids: Sequence[str]
) -> list[tuple[str, int, str | None]]:
    """(item id, row id, text sha256) of those of ``item_ids`` whose vector ``job_id`` holds."""
    rows = session.execute(
        select(Embedding.item_id, Embedding.id, Embedding.text_sha256).where(
            Embedding.job_id == job_id, Embedding.item_id.in_(item_ids)
        )
    )
    return [(item_id, row_id, sha) for item_id, row_id, sha in rows]


def forget_items(session: Session, job_id: str, item_ids: Sequence[str]) -> tuple[int, int]:
    """Delete what ``job_id`` holds of ``item_ids`` (their vectors and failures) and uncount
    it: a changed text about to be embedded again, or an id gone from the source (``--prune``).
    Returns (vectors, failures) deleted."""
    if not item_ids:
        return 0, 0
    vectors: Any = session.execute(
        delete(Embedding).where(Embedding.job_id == job_id, Embedding.item_id.in_(item_ids))
    )
    failures: Any = session.execute(
        delete(FailedItem).where(FailedItem.job_id == job_id, FailedItem.item_id.in_(item_ids))
    )
    done, failed = int(vectors.rowcount), int(failures.rowcount)
    if done:
        vector_index.forget(session, job_id, item_ids)
    if done or failed:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(done_items=Job.done_items - done, failed_items=Job.failed_items - failed)
        )
    return done, failed


def held_items(session: Session, job_id: str, page: int = 5000) -> Iterator[str]:
    """Every item id ``job_id`` holds, stored or failed, a page at a time in id order."""
    for model in (Embedding, FailedItem):
        after = ""
        while True:
            ids = session.scalars(
                select(model.item_id)
                .where(model.job_id == job_id, model.item_id > after)
                .order_by(model.item_id)
                .limit(page)
            ).all()
            yield from ids
            if len(ids) < page:
                break
            after = ids[-1]


def failed_items(session: Session, job_id: str, item_ids: Sequence[str]) -> list[tuple[str, int]]:
    """(item id, row id) of those of ``item_ids`` recorded failed in ``job_id``."""
    rows = session.execute(
        select(FailedItem.item_id, FailedItem.id).where(
            FailedItem.job_id == job_id, FailedItem.item_id.in_(item_ids)
        )
    )
    return [(item_id, row_id) for item_id, row_id in rows]


def add_reused(session: Session, job_id: str, count: int) -> None:
    """Count items whose vector was copied from the content cache."""
    session.execute(
        update(Job).where(Job.id == job_id).values(reused_items=Job.reused_items + count)
    )


def seal_job(
    session: Session,
    name: str,
    job_id: str,
    duplicates: int,
    last_sync: dict[str, Any] | None = None,
) -> None:
    """Fix the job's total at the items accounted for (done or failed) and seal it, build its
    vector index where it has none yet, and record the run's duplicates and what it found
    (``last_sync``) on backfill ``name``. The caller settles the job's state
    (``jobs.add_progress``)."""
    seal_accounted(session, job_id)
    vector_index.build(session, job_id)
    session.execute(
        update(Backfill)
        .where(Backfill.name == name)
        .values(duplicates=duplicates, last_sync=last_sync)
    )


def seal_accounted(session: Session, job_id: str) -> None:
    """Fix the job's total at the items accounted for (done or failed) and seal it: a run that
    sends no more. The caller settles the job's state (``jobs.add_progress``)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(total_items=Job.done_items + Job.failed_items, sealed=True)
    )


def failure_reasons(session: Session, job_id: str, limit: int) -> list[tuple[str, int]]:
    """The most common reasons items of ``job_id`` failed, with their counts."""
    rows = session.execute(
        select(FailedItem.reason, func.count())
        .where(FailedItem.job_id == job_id)
        .group_by(FailedItem.reason)
        .order_by(func.count().desc())
        .limit(limit)
    )
    return [(reason, int(count)) for reason, count in rows]


def failed_examples(session: Session, job_id: str, limit: int) -> list[str]:
    """Some ids of failed items of ``job_id``."""
    return list(
        session.scalars(select(FailedItem.item_id).where(FailedItem.job_id == job_id).limit(limit))
    )
