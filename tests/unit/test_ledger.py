"""The batch ledger on a SQLite store: what it keeps of a pending batch to publish it again
(``kept``), and which batches are overdue or claimed at a given present (``now=``)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage import ledger
from storage.models import Batch, BatchState, Job
from storage.session import make_engine, scope, session_factory

BATCHES = [
    ledger.NewBatch(0, ["a", "b"], ["first text", "second text"], [1, 0]),
    ledger.NewBatch(1, ["c"], ["third text"], [2]),
]


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    """A job of three items in two batches, recorded as its producer records them."""
    engine = make_engine(sqlite_url)
    factory = session_factory(engine)
    with scope(factory) as session:
        session.add(Job(id="j", model_name="m", queue="bulk", total_items=3, meta={}))
        session.flush()
        ledger.add_batches(session, "j", BATCHES)
    yield factory
    engine.dispose()


def batch(sessions: sessionmaker[Session], index: int) -> Batch:
    with scope(sessions) as session:
        found = ledger.get_batch(session, "j", index)
        assert found is not None
        session.expunge(found)
        return found


def test_a_pending_batch_keeps_what_its_producer_recorded(
    sessions: sessionmaker[Session],
) -> None:
    assert [ledger.kept(batch(sessions, b.index)) for b in BATCHES] == BATCHES


def test_an_ended_batch_keeps_nothing(sessions: sessionmaker[Session]) -> None:
    with scope(sessions) as session:
        assert ledger.finish(session, "j", 0, BatchState.DONE)
    assert batch(sessions, 0).payload is None
    assert ledger.kept(batch(sessions, 0)) is None
    assert ledger.kept(batch(sessions, 1)) == BATCHES[1]


def test_a_batch_sent_without_embedq_s_producer_keeps_no_texts(
    sessions: sessionmaker[Session],
) -> None:
    with scope(sessions) as session:  # a raw message's batch, learnt of when it was claimed
        ledger.adopt(session, "j", 5, ["x", "y"], "host:1")
    assert ledger.kept(batch(sessions, 5)) is None
    no_texts = Batch(batch_index=6, item_ids=["z"], payload={"texts": [], "positions": [0]})
    assert ledger.kept(no_texts) is None


def test_a_batch_is_overdue_once_stuck_after_has_passed_at_the_present_given(
    sessions: sessionmaker[Session],
) -> None:
    now = datetime.now(UTC)
    with scope(sessions) as session:
        assert ledger.overdue_batches(session, 60, now=now) == []
        assert ledger.count_overdue(session, 60, now=now) == 0
        later = now + timedelta(seconds=61)
        assert [b.batch_index for b in ledger.overdue_batches(session, 60, now=later)] == [0, 1]
        assert ledger.count_overdue(session, 60, job_id="j", now=later) == 2
        assert ledger.count_overdue(session, 60, job_id="other", now=later) == 0
        assert len(ledger.overdue_batches(session, 60, limit=1, now=later)) == 1
        # Only a batch a worker claimed counts as claimed.
        assert ledger.claimed_batches(session, 60, now=later) == []
        assert ledger.claim(session, "j", 1, "host:7").claimed
    with scope(sessions) as session:
        claimed = ledger.claimed_batches(session, 60, now=datetime.now(UTC) + timedelta(seconds=61))
        assert [(b.batch_index, b.worker) for b in claimed] == [(1, "host:7")]
