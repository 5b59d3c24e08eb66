"""OpenAI batches (``POST /v1/batches``): their rows, the lines of each batch's input as its
validation found them, and what the job of a batch holds of each line's texts.

A batch's texts are items of its job named ``LLLLLLLL.I``: the input line (eight digits, so
the names sort by line) and the text's index in that line's ``input``. A request is completed
when its job stores as many items of its line as it has inputs, and failed when any item of its
line failed; both are counted here in SQL, from the item names, so the counts are the store's
whoever asks (any ``serve`` instance, after any restart). The batch's runner counts and keeps the
counts on the batch's row (``keep_counts``), where a poll reads them: a count reads every
stored text of the batch, a poll one row.

Functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Integer,
    and_,
    cast,
    delete,
    distinct,
    func,
    insert,
    literal,
    select,
    union_all,
    update,
)
from sqlalchemy.orm import Session

from storage.models import (
    Embedding,
    FailedItem,
    OpenAIBatch,
    OpenAIBatchRequest,
    OpenAIBatchStatus,
)

LINE_DIGITS = 8
"""Digits of the line number that opens each item name of a batch's job."""

UNFINISHED = tuple(status for status in OpenAIBatchStatus if not status.final)
"""Batch statuses that a runner still has to move on."""


def item_name(line: int, index: int) -> str:
    """The item name of text ``index`` of input line ``line``."""
    return f"{line:0{LINE_DIGITS}d}.{index}"


def _line_of(column: Any) -> Any:
    return cast(func.substr(column, 1, LINE_DIGITS), Integer)


@dataclass(frozen=True)
class StoredText:
    """One stored text of a batch request: its vector (float32 bytes) and token count."""

    index: int
    vector: bytes
    token_count: int


@dataclass(frozen=True)
class LineItems:
    """What the job holds of one input line: its stored texts and its failures' reasons."""

    stored: dict[int, StoredText]
    failures: list[str]


def add_batch(session: Session, batch: OpenAIBatch) -> OpenAIBatch:
    session.add(batch)
    return batch


def get_batch(session: Session, batch_id: str, owner: str | None = None) -> OpenAIBatch | None:
    """The batch ``batch_id``; ``None`` when there is none, or it is not ``owner``'s."""
    found = session.get(OpenAIBatch, batch_id)
    return found if found is not None and owner in (None, found.owner) else None


def list_batches(
    session: Session, owner: str, after: datetime | None, limit: int
) -> Sequence[OpenAIBatch]:
    """``owner``'s batches, the newest first, those created before ``after`` when given."""
    query = select(OpenAIBatch).where(OpenAIBatch.owner == owner)
    if after is not None:
        query = query.where(OpenAIBatch.created_at < after)
    return session.scalars(query.order_by(OpenAIBatch.created_at.desc()).limit(limit)).all()


def unfinished_batches(session: Session) -> list[str]:
    """The ids of batches not yet in a final status, the oldest first."""
    return list(
        session.scalars(
            select(OpenAIBatch.id)
            .where(OpenAIBatch.status.in_(UNFINISHED))
            .order_by(OpenAIBatch.created_at)
        )
    )


def move_batch(
    session: Session, batch_id: str, to: str, *, only_from: Sequence[str], **fields: Any
) -> bool:
    """Set batch ``batch_id``'s status to ``to`` (and ``fields``) if it is one of
    ``only_from``; returns whether it moved. The condition makes two runners, or a runner
    and a cancel, agree on one order."""
    result: Any = session.execute(
        update(OpenAIBatch)
        .where(OpenAIBatch.id == batch_id, OpenAIBatch.status.in_(only_from))
        .values(status=to, **fields)
    )
    return int(result.rowcount) == 1


def clear_requests(session: Session, batch_id: str) -> None:
    """Forget a validation that did not finish (it starts again from the first line)."""
    session.execute(delete(OpenAIBatchRequest).where(OpenAIBatchRequest.batch_id == batch_id))


def add_requests(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Record validated lines: ``batch_id``, ``line``, ``custom_id``, ``inputs``, ``base64``,
    ``error_code``, ``error``."""
    if rows:
        session.execute(insert(OpenAIBatchRequest), list(rows))


def reject_duplicates(session: Session, batch_id: str, code: str, message: str) -> int:
    """Mark as errors the lines whose custom id an earlier line of the batch has; returns how
    many. Found in SQL, so validation holds no set of ids in memory."""
    first = (
        select(OpenAIBatchRequest.custom_id, func.min(OpenAIBatchRequest.line).label("first"))
        .where(OpenAIBatchRequest.batch_id == batch_id, OpenAIBatchRequest.custom_id.is_not(None))
        .group_by(OpenAIBatchRequest.custom_id)
        .having(func.count() > 1)
        .subquery()
    )
    lines = list(
        session.scalars(
            select(OpenAIBatchRequest.line)
            .join(first, first.c.custom_id == OpenAIBatchRequest.custom_id)
            .where(OpenAIBatchRequest.batch_id == batch_id, OpenAIBatchRequest.line > first.c.first)
        )
    )
    if lines:
        session.execute(
            update(OpenAIBatchRequest)
            .where(OpenAIBatchRequest.batch_id == batch_id, OpenAIBatchRequest.line.in_(lines))
            .values(error_code=code, error=message, inputs=0)
        )
    return len(lines)


def rejected_lines(session: Session, batch_id: str) -> set[int]:
    """The lines of the batch that are not requests it runs."""
    return set(
        session.scalars(
            select(OpenAIBatchRequest.line).where(
                OpenAIBatchRequest.batch_id == batch_id, OpenAIBatchRequest.error_code.is_not(None)
            )
        )
    )


def count_inputs(session: Session, batch_id: str) -> tuple[int, int]:
    """(lines, texts to embed) of the batch."""
    lines, texts = session.execute(
        select(func.count(), func.coalesce(func.sum(OpenAIBatchRequest.inputs), 0)).where(
            OpenAIBatchRequest.batch_id == batch_id
        )
    ).one()
    return int(lines), int(texts)


def first_error(session: Session, batch_id: str) -> OpenAIBatchRequest | None:
    return session.scalars(
        select(OpenAIBatchRequest)
        .where(OpenAIBatchRequest.batch_id == batch_id, OpenAIBatchRequest.error_code.is_not(None))
        .order_by(OpenAIBatchRequest.line)
        .limit(1)
    ).first()


def request_counts(session: Session, batch_id: str, job_id: str | None) -> tuple[int, int, int]:
    """(total, completed, failed) requests: a line that is not a request is failed; a request
    is completed when the job stores every one of its texts, failed when any of them failed."""
    total, rejected = session.execute(
        select(
            func.count(),
            func.count(OpenAIBatchRequest.error_code),
        ).where(OpenAIBatchRequest.batch_id == batch_id)
    ).one()
    if job_id is None:
        return int(total), 0, int(rejected)
    # One pass over both sides, grouped by line, with no join: each valid request line counts
    # -inputs and each stored text +1, so a line whose sum is 0 is complete. (Joined to a
    # per-line count of the stored texts, PostgreSQL planned a nested loop on estimates of a few
    # hundred lines: one poll of a 200,000-line batch took over ten minutes.)
    entries = union_all(
        select(
            OpenAIBatchRequest.line.label("line"), (-OpenAIBatchRequest.inputs).label("n")
        ).where(OpenAIBatchRequest.batch_id == batch_id, OpenAIBatchRequest.error_code.is_(None)),
        select(_line_of(Embedding.item_id).label("line"), literal(1).label("n")).where(
            Embedding.job_id == job_id
        ),
    ).subquery()
    complete = (
        select(entries.c.line)
        .group_by(entries.c.line)
        .having(and_(func.sum(entries.c.n) == 0, func.min(entries.c.n) < 0))
        .subquery()
    )
    completed = session.scalar(select(func.count()).select_from(complete))
    failed = session.scalar(
        select(func.count(distinct(_line_of(FailedItem.item_id)))).where(
            FailedItem.job_id == job_id
        )
    )
    return int(total), int(completed or 0), int(rejected) + int(failed or 0)


def keep_counts(session: Session, batch_id: str, job_id: str | None) -> tuple[int, int, int]:
    """Count the batch's requests (``request_counts``) and keep them on its row while it runs,
    where ``GET /v1/batches/{id}`` reads them: a poll reads one row whatever the batch's size,
    and only the batch's runner counts. A batch that has ended keeps the counts it ended with."""
    counts = request_counts(session, batch_id, job_id)
    total, completed, failed = counts
    session.execute(
        update(OpenAIBatch)
        .where(OpenAIBatch.id == batch_id, OpenAIBatch.status.in_(UNFINISHED))
        .values(total=total, completed=completed, failed=failed)
    )
    return counts


def set_file_sizes(
    session: Session, batch_id: str, output_bytes: int | None, error_bytes: int | None
) -> None:
    """Record the sizes of an ended batch's output and error files."""
    session.execute(
        update(OpenAIBatch)
        .where(OpenAIBatch.id == batch_id)
        .values(output_bytes=output_bytes, error_bytes=error_bytes)
    )


def request_page(
    session: Session, batch_id: str, after: int, limit: int
) -> list[OpenAIBatchRequest]:
    """The batch's lines after line ``after``, in order, ``limit`` at most."""
    return list(
        session.scalars(
            select(OpenAIBatchRequest)
            .where(OpenAIBatchRequest.batch_id == batch_id, OpenAIBatchRequest.line > after)
            .order_by(OpenAIBatchRequest.line)
            .limit(limit)
        )
    )


def items_of_lines(session: Session, job_id: str, first: int, last: int) -> dict[int, LineItems]:
    """What ``job_id`` holds of input lines ``first`` to ``last``, by line: a range of item
    names, read through the job's (job, item) index."""
    low, high = item_name(first, 0)[:LINE_DIGITS], item_name(last + 1, 0)[:LINE_DIGITS]
    found: dict[int, LineItems] = {}
    rows = session.execute(
        select(Embedding.item_id, Embedding.vector, Embedding.token_count).where(
            Embedding.job_id == job_id, Embedding.item_id >= low, Embedding.item_id < high
        )
    )
    for item_id, vector, tokens in rows:
        line, _, index = item_id.partition(".")
        entry = found.setdefault(int(line), LineItems({}, []))
        entry.stored[int(index)] = StoredText(int(index), bytes(vector), int(tokens))
    failures = session.execute(
        select(FailedItem.item_id, FailedItem.reason).where(
            FailedItem.job_id == job_id, FailedItem.item_id >= low, FailedItem.item_id < high
        )
    )
    for item_id, reason in failures:
        found.setdefault(int(item_id[:LINE_DIGITS]), LineItems({}, [])).failures.append(reason)
    return found
