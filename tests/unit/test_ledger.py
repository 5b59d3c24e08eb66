"""The batch ledger on a SQLite store: what it keeps of a pending batch to publish it again
(``kept``), which batches are overdue or claimed at a given present (``now=``), what a claim
reads to check a message against, how a refused message is recorded, and a job's counts that
never pass its total."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage import batch_failures, jobs, ledger, stalled
from storage.models import Batch, BatchState, FailedItem, Job
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
        assert stalled.overdue_batches(session, 60, now=now) == []
        assert stalled.count_overdue(session, 60, now=now) == 0
        later = now + timedelta(seconds=61)
        assert [b.batch_index for b in stalled.overdue_batches(session, 60, now=later)] == [0, 1]
        assert stalled.count_overdue(session, 60, job_id="j", now=later) == 2
        assert stalled.count_overdue(session, 60, job_id="other", now=later) == 0
        assert len(stalled.overdue_batches(session, 60, limit=1, now=later)) == 1
        # Only a batch a worker claimed counts as claimed.
        assert stalled.claimed_batches(session, 60, now=later) == []
        assert ledger.claim(session, "j", 1, "host:7").claimed
    with scope(sessions) as session:
        claimed = stalled.claimed_batches(
            session, 60, now=datetime.now(UTC) + timedelta(seconds=61)
        )
        assert [(b.batch_index, b.worker) for b in claimed] == [(1, "host:7")]


def test_a_claim_reads_the_items_recorded_and_the_job_it_checks_a_message_against(
    sessions: sessionmaker[Session],
) -> None:
    with scope(sessions) as session:
        pending = ledger.claim(session, "j", 0, "host:1")
        unknown = ledger.claim(session, "j", 9, "host:1")
        ledger.finish(session, "j", 1, BatchState.DONE)
        ended = ledger.claim(session, "j", 1, "host:1")
        taken, facts = ledger.claim_many(session, [("j", 0), ("j", 1), ("j", 9)], "host:2")
    job = ledger.JobFacts(total=3, model="m", finished=False)
    assert pending == ledger.Claim(BatchState.SENT, True, ["a", "b"], job)
    assert unknown == ledger.Claim(None, False, None, job)
    assert ended == ledger.Claim(BatchState.DONE, False, ["c"], job)
    assert (taken, facts) == ({("j", 0): ["a", "b"]}, {"j": job})


def test_a_batch_two_deliveries_adopt_at_once_is_recorded_by_the_first(
    sessions: sessionmaker[Session],
) -> None:
    with scope(sessions) as session:
        assert ledger.adopt(session, "j", 5, ["x"], "host:1")
        assert not ledger.adopt(session, "j", 5, ["y"], "host:2")  # the transaction goes on
        assert ledger.claim(session, "j", 5, "host:2").recorded == ["x"]
    assert batch(sessions, 5).item_ids == ["x"]


def test_a_refused_message_of_an_ended_job_is_recorded_in_the_ledger_and_counts_nothing(
    sessions: sessionmaker[Session],
) -> None:
    with scope(sessions) as session:
        ledger.finish(session, "j", 1, BatchState.DONE)
        batch_failures.refuse(session, "j", 0, ["a", "b"], "pending, refused")
        batch_failures.refuse(session, "j", 1, ["z"], "ended, refused")
        batch_failures.refuse(session, "j", 7, ["y"], "unknown, refused")
    found = {index: batch(sessions, index) for index in (0, 1, 7)}
    assert {i: (b.state, b.last_error) for i, b in found.items()} == {
        0: (BatchState.FAILED, "pending, refused"),
        1: (BatchState.DONE, "ended, refused"),
        7: (BatchState.FAILED, "unknown, refused"),
    }
    assert (found[1].item_ids, found[7].item_ids) == (["c"], ["y"])
    with scope(sessions) as session:
        job = jobs.get_job(session, "j")
        assert job is not None
        assert (job.done_items, job.failed_items, job.error) == (0, 0, None)
        assert session.query(FailedItem).count() == 0


def test_a_job_is_never_counted_past_its_total(sessions: sessionmaker[Session]) -> None:
    """Items stored past the total raise, so the batch's transaction stores nothing of them;
    failures are always counted (a failing batch ends its items, whatever else went wrong)."""
    with scope(sessions) as session:
        assert jobs.settle_progress(session, "j", done=2, failed=0, error=None) is None
    past = pytest.raises(jobs.OverfullJobError, match="job j has no room for 2 more items")
    with past, scope(sessions) as session:
        jobs.settle_progress(session, "j", done=2, failed=0, error=None)
    with (
        pytest.raises(jobs.OverfullJobError, match="no room for 2 more items"),
        scope(sessions) as s,
    ):
        jobs.settle_many(s, {"j": 2})
    with scope(sessions) as session:
        settled = jobs.settle_progress(session, "j", done=0, failed=2, error="failed")
        assert settled is not None and settled.state == "partially_failed"
    with scope(sessions) as session:
        job = jobs.get_job(session, "j")
        assert job is not None
        assert (job.done_items, job.failed_items, job.error) == (2, 2, "failed")
