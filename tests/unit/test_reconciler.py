"""The reconciler judged by the clock it is handed, not by sleeping: on a SQLite store, a job is
submitted to a broker that keeps its messages and never runs them (``RecordingPublisher``); the
reconciler, asking no broker (``presence=None``: every overdue batch counts as lost), publishes
what stopped moving again, and fails it once it was lost too often."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage import jobs, ledger
from storage.models import FailedItem, FailureKind
from storage.session import dispose_all, scope, sessions_for
from tasks import names, producer
from tasks.fleet.reconciler import Reconciler
from tests.fakes import RecordingPublisher
from worker.settings import Settings

STUCK_AFTER = 60.0


@dataclass
class Clock:
    """The present as the reconciler sees it, moved on by the test."""

    at: datetime

    def __call__(self) -> datetime:
        return self.at

    def after_stuck(self) -> None:
        """Later than any batch's last progress so far by ``stuck_after`` and a second."""
        self.at = datetime.now(UTC) + timedelta(seconds=STUCK_AFTER + 1)


@dataclass
class Fleet:
    settings: Settings
    sessions: sessionmaker[Session]
    clock: Clock
    lost: RecordingPublisher
    """The broker the producer sent to: it keeps the messages and runs none."""
    again: RecordingPublisher
    """Where the reconciler publishes."""

    def reconciler(self, holder: str = "host-a:1") -> Reconciler:
        return Reconciler(self.settings, self.sessions, self.again, None, holder, clock=self.clock)

    def submit(self, texts: list[str], queue: names.Queue = names.Queue.BULK) -> str:
        job = producer.submit(
            texts, model="m", queue=queue, settings=self.settings, publisher=self.lost
        )
        return job.id


@pytest.fixture
def fleet(sqlite_url: str) -> Iterator[Fleet]:
    settings = Settings(
        database_url=sqlite_url,
        broker_url="redis://127.0.0.1:1/0",  # never reached: publishers are handed in
        stuck_after=STUCK_AFTER,
        max_retries=1,
        job_batch_size=2,
    )
    clock = Clock(datetime.now(UTC))
    yield Fleet(
        settings, sessions_for(sqlite_url), clock, RecordingPublisher(), RecordingPublisher()
    )
    dispose_all()


def test_a_batch_sent_now_is_not_overdue_at_the_present(fleet: Fleet) -> None:
    fleet.submit(["one text", "two texts", "three"])
    report = fleet.reconciler().sweep()
    assert report.swept and (report.overdue, report.republished, report.failed) == (0, 0, 0)
    assert fleet.again.sent == []


def test_a_batch_stuck_past_stuck_after_is_published_again_as_it_was_sent(fleet: Fleet) -> None:
    job_id = fleet.submit(["one text", "two texts", "three"], queue=names.Queue.INTERACTIVE)
    fleet.clock.after_stuck()
    report = fleet.reconciler().sweep()
    assert (report.overdue, report.on_broker, report.republished, report.failed) == (2, 0, 2, 0)
    assert report.finished_jobs == ()
    original = {m.batch_index: m for m in fleet.lost.sent}
    assert sorted(m.batch_index for m in fleet.again.sent) == [0, 1]
    for message in fleet.again.sent:
        sent = original[message.batch_index]
        assert (message.job_id, message.model) == (job_id, "m")
        assert (message.texts, message.item_ids, message.positions) == (
            sent.texts,
            sent.item_ids,
            sent.positions,
        )
        assert message.task_id == sent.task_id  # the broker can be asked for it by its id
    assert fleet.again.queues == ["interactive", "interactive"]  # the job's own queue
    with scope(fleet.sessions) as session:
        pending = ledger.pending_batches(session, job_id)
        assert [(b.sends, b.state) for b in pending] == [(2, "sent"), (2, "sent")]
        assert [b.last_error for b in pending] == ["message lost; re-published (send 2)"] * 2
    # Re-publishing is progress: at the present, nothing is overdue any more.
    fleet.clock.at = datetime.now(UTC)
    assert fleet.reconciler().sweep().overdue == 0


def test_a_batch_lost_more_often_than_max_retries_fails_as_lost(fleet: Fleet) -> None:
    job_id = fleet.submit(["one text", "two texts"])
    fleet.clock.after_stuck()
    assert fleet.reconciler().sweep().republished == 1  # sent twice now: 1 + max_retries
    fleet.clock.after_stuck()
    report = fleet.reconciler().sweep()
    assert (report.overdue, report.republished, report.failed) == (1, 0, 1)
    assert report.finished_jobs == (job_id,)
    assert len(fleet.again.sent) == 1
    with scope(fleet.sessions) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None
        assert (job.state, job.failed_items, job.error_kind) == ("failed", 2, FailureKind.LOST)
        assert job.error is not None and "its message was lost 2 times" in job.error
        kinds = [item.kind for item in session.query(FailedItem).all()]
        assert kinds == [FailureKind.LOST, FailureKind.LOST]
        assert ledger.job_batches(session, job_id) == {"failed": 1}


def test_a_lost_batch_whose_texts_the_ledger_does_not_hold_fails_at_once(fleet: Fleet) -> None:
    job_id = fleet.submit(["one text"])
    with scope(fleet.sessions) as session:  # a raw message's batch: its texts were never kept
        ledger.adopt(session, job_id, 1, ["raw-0"], "host-b:9")
    fleet.clock.after_stuck()
    report = fleet.reconciler().sweep()
    assert (report.overdue, report.republished, report.failed) == (2, 1, 1)
    with scope(fleet.sessions) as session:
        (failed,) = session.query(FailedItem).all()
        assert (failed.item_id, failed.kind) == ("raw-0", FailureKind.LOST)
        assert "the ledger holds no texts to send it again" in failed.reason


def test_one_reconciler_sweeps_at_a_time(fleet: Fleet) -> None:
    fleet.submit(["one text"])
    fleet.clock.after_stuck()
    assert fleet.reconciler("host-a:1").sweep().swept
    other = fleet.reconciler("host-b:2").sweep()
    assert not other.swept and other.republished == 0
    assert len(fleet.again.sent) == 1
