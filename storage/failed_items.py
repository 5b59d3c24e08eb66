"""Items that could not be embedded, each with its reason, once per (job, item).

Functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from storage import dialect
from storage.models import FailedItem, FailureKind


def _insert(session: Session) -> Any:
    insert: Any = dialect.upsert(session, FailedItem.__table__)
    return insert.on_conflict_do_nothing(index_elements=["job_id", "item_id"]).returning(
        FailedItem.__table__.c.id
    )


def record_failures(
    session: Session, job_id: str, item_ids: Sequence[str], reason: str, kind: FailureKind
) -> int:
    """Record items of ``job_id`` as failed for ``reason`` (of ``kind``); returns how many were
    not already recorded (so a redelivered failing batch counts its items once)."""
    if not item_ids:
        return 0
    now = datetime.now(UTC)
    rows = [
        {"job_id": job_id, "item_id": i, "reason": reason, "kind": kind.value, "created_at": now}
        for i in item_ids
    ]
    statement = dialect.prepared(session, "failure", _insert)
    return len(session.connection().execute(statement, rows).all())
