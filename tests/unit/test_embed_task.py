"""One batch run and recorded (``tasks.batches``) on a SQLite store, with the fake engine."""

import time
from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage import embeddings, jobs, ledger
from storage.models import FailedItem, FailureKind, Job
from storage.session import make_engine, scope, session_factory
from tasks.batches import embed_batch, fail_batch, run_message
from tasks.message import BatchMessage
from tasks.outcomes import Delivery
from tests.fakes import FakeEngine, fake_runtime
from worker.settings import Settings


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(sqlite_url)
    factory = session_factory(engine)
    with scope(factory) as session:
        session.add(Job(id="j", model_name="fake", queue="interactive", total_items=3, meta={}))
    yield factory
    engine.dispose()


def payload(texts: list[str]) -> BatchMessage:
    return BatchMessage(
        job_id="j",
        batch_index=0,
        model="fake",
        texts=texts,
        item_ids=[f"i{n}" for n in range(len(texts))],
        positions=list(range(len(texts))),
        enqueued_at=time.time(),
    )


def test_a_redelivered_batch_writes_each_item_once(sessions: sessionmaker[Session]) -> None:
    batch = payload(["alpha", "beta gamma", "delta"])
    finished = []
    for _ in range(2):  # delivered twice, as after a lost acknowledgement
        with scope(sessions) as session:
            outcome = embed_batch(session, FakeEngine(), batch, provider="FakeProvider")
            finished.append(outcome.finished)
    assert finished == [True, False]  # only the delivery that finished the job signals it
    with scope(sessions) as session:
        job = jobs.get_job(session, "j")
        assert job is not None
        assert (job.state, job.done_items, job.failed_items) == ("succeeded", 3, 0)
        stored = embeddings.list_embeddings(session, "j")
        assert [e.item_id for e in stored] == ["i0", "i1", "i2"]
        assert [e.token_count for e in stored] == [3, 4, 3]
        expected = FakeEngine().encode(batch.texts).vectors
        np.testing.assert_array_equal(
            np.stack([np.frombuffer(e.vector, dtype=np.float32) for e in stored]), expected
        )


def test_a_bad_text_fails_the_batch_with_a_stored_reason(sessions: sessionmaker[Session]) -> None:
    with scope(sessions) as session:
        outcome = embed_batch(
            session, FakeEngine(), payload(["fine", "   ", "ok"]), provider="FakeProvider"
        )
    assert outcome.state == "failed" and outcome.reason and "whitespace only" in outcome.reason
    with scope(sessions) as session:
        job = jobs.get_job(session, "j")
        assert job is not None
        assert (job.state, job.done_items, job.failed_items) == ("failed", 0, 3)
        assert job.error is not None and "index 1 are empty or whitespace only" in job.error
        assert job.error_kind == FailureKind.INPUT


def test_a_text_the_model_reads_nothing_in_fails_alone_as_input(
    sessions: sessionmaker[Session],
) -> None:
    """A text of zero-width spaces passes every check a producer can make, but the model's
    tokenizer keeps none of it: that item fails as input, the others are stored."""
    with scope(sessions) as session:
        outcome = embed_batch(
            session, FakeEngine(), payload(["fine", "\u200b\u200b", "ok"]), provider="Fake"
        )
    assert outcome.state == Delivery.DONE and outcome.finished and outcome.texts == 2
    assert outcome.status is not None
    assert (outcome.status["state"], outcome.status["error_kind"]) == ("partially_failed", "input")
    with scope(sessions) as session:
        job = jobs.get_job(session, "j")
        assert job is not None
        assert (job.done_items, job.failed_items) == (2, 1)
        assert job.error is not None and "reads nothing in this text" in job.error
        assert [e.item_id for e in embeddings.list_embeddings(session, "j")] == ["i0", "i2"]
        (failed,) = session.query(FailedItem).all()
        assert (failed.item_id, failed.kind) == ("i1", FailureKind.INPUT)
        expected = FakeEngine().encode(["fine", "ok"]).vectors
        stored = embeddings.list_embeddings(session, "j")
        np.testing.assert_array_equal(
            np.stack([np.frombuffer(e.vector, dtype=np.float32) for e in stored]), expected
        )


def test_a_malformed_message_fails_its_items_with_a_readable_reason(
    sessions: sessionmaker[Session], sqlite_url: str
) -> None:
    runtime = fake_runtime(Settings(database_url=sqlite_url))
    outcome = run_message({"job_id": "j", "batch_index": -1, "texts": ["a", "b", "c"]}, runtime)
    dropped = run_message({"no": "job id"}, runtime)
    assert dropped.state == "dropped" and dropped.job_id is None
    assert outcome.state == "failed" and outcome.reason
    assert outcome.reason.startswith("malformed batch")
    with scope(sessions) as session:
        job = jobs.get_job(session, "j")
        assert job is not None
        # Which items the broken batch carried cannot be told: the rest of the job fails.
        assert (job.state, job.failed_items) == ("failed", 3)
        assert job.error is not None and "batch_index" in job.error and "model" in job.error
        assert job.error_kind == FailureKind.INPUT
        assert ledger.job_batches(session, "j") == {}


def test_progress_events_go_to_flower_at_most_every_interval() -> None:
    from tasks.embed import _progress_events

    class Task:
        def __init__(self) -> None:
            self.events: list[tuple[str, dict[str, int]]] = []

        def send_event(self, kind: str, **fields: int) -> None:
            self.events.append((kind, fields))

    eager, slow = Task(), Task()
    report = _progress_events(eager, every_s=0.0)
    for done in (16, 32, 48, 64):
        report(done, 64)
    assert eager.events == [("task-progress", {"current": n, "total": 64}) for n in (16, 32, 48)]
    throttled = _progress_events(slow, every_s=60.0)
    for done in (16, 32, 48, 64):
        throttled(done, 64)
    assert slow.events == []


def test_a_failure_reported_after_the_batch_was_stored_changes_nothing(
    sessions: sessionmaker[Session],
) -> None:
    """A late delivery that fails (its model broke meanwhile, its process died) must not count
    items another delivery already stored as failed."""
    batch = payload(["alpha", "beta gamma", "delta"])
    with scope(sessions) as session:
        ledger.add_batches(
            session, "j", [ledger.NewBatch(0, batch.item_ids, batch.texts, batch.positions)]
        )
    with scope(sessions) as session:
        assert embed_batch(session, FakeEngine(), batch, provider="FakeProvider").finished
    with scope(sessions) as session:
        reason = "worker process died 4 times on this batch"
        late = fail_batch(session, batch, reason, FailureKind.WORKER)
        assert not late.finished
    with scope(sessions) as session:
        job = jobs.get_job(session, "j")
        assert job is not None
        assert (job.state, job.done_items, job.failed_items) == ("succeeded", 3, 0)
        assert ledger.job_batches(session, "j") == {"done": 1}


# --- messages that do not fit their job (a producer that bypassed embedq's) ---------------------
def raw(batch_index: int, ids: list[str], positions: list[int], model: str = "fake") -> dict:
    """A raw message of job ``j`` (three items), as an application could send it."""
    return {
        "job_id": "j",
        "batch_index": batch_index,
        "model": model,
        "texts": [f"text of {item}" for item in ids],
        "item_ids": ids,
        "positions": positions,
        "enqueued_at": time.time(),
    }


def ended(sessions: sessionmaker[Session]) -> tuple[Job, list[str], dict[str, int]]:
    """Job ``j``'s row, the items stored under it, and its batches by state."""
    with scope(sessions) as session:
        job = jobs.get_job(session, "j")
        assert job is not None
        session.expunge(job)
        stored = [e.item_id for e in embeddings.list_embeddings(session, "j")]
        return job, stored, ledger.job_batches(session, "j")


def test_a_batch_index_sent_again_with_other_items_fails_those_items(
    sessions: sessionmaker[Session], sqlite_url: str
) -> None:
    runtime = fake_runtime(Settings(database_url=sqlite_url))
    assert run_message(raw(0, ["i0", "i1"], [0, 1]), runtime).state == Delivery.DONE
    again = run_message(raw(0, ["i2"], [2]), runtime)
    assert again.state == Delivery.FAILED and again.finished
    job, stored, batches = ended(sessions)
    assert (job.state, job.done_items, job.failed_items) == ("partially_failed", 2, 1)
    assert job.error is not None and "batch 0 of job j was already sent with other items" in (
        job.error
    )
    assert (stored, batches) == (["i0", "i1"], {"done": 1})


def test_a_message_for_a_job_that_ended_is_refused_and_recorded(
    sessions: sessionmaker[Session], sqlite_url: str
) -> None:
    runtime = fake_runtime(Settings(database_url=sqlite_url))
    assert run_message(raw(0, ["i0", "i1", "i2"], [0, 1, 2]), runtime).finished
    late = run_message(raw(1, ["x0", "x1"], [0, 1]), runtime)
    reused = run_message(raw(0, ["x2"], [2]), runtime)
    again = run_message(raw(0, ["i0", "i1", "i2"], [0, 1, 2]), runtime)  # a redelivery
    assert [o.state for o in (late, reused, again)] == ["dropped", "dropped", "skipped"]
    assert late.reason is not None and "came after its job had ended" in late.reason
    job, stored, batches = ended(sessions)
    assert (job.state, job.done_items, job.failed_items, job.error) == ("succeeded", 3, 0, None)
    assert (stored, batches) == (["i0", "i1", "i2"], {"done": 1, "failed": 1})
    with scope(sessions) as session:
        refused = ledger.get_batch(session, "j", 1)
        assert refused is not None and refused.last_error == late.reason
        assert session.query(FailedItem).count() == 0


def test_a_message_naming_another_model_than_its_job_stores_nothing(
    sessions: sessionmaker[Session], sqlite_url: str
) -> None:
    runtime = fake_runtime(Settings(database_url=sqlite_url))  # has an engine for any name
    outcome = run_message(raw(0, ["i0", "i1", "i2"], [0, 1, 2], model="other"), runtime)
    assert outcome.state == Delivery.FAILED and outcome.finished
    job, stored, batches = ended(sessions)
    assert (job.state, job.failed_items, job.error_kind) == ("failed", 3, FailureKind.INPUT)
    assert job.error == "malformed batch: it names model 'other', its job 'fake'"
    assert (stored, batches) == ([], {"failed": 1})


def test_a_batch_its_job_has_no_room_for_stores_nothing_and_ends_the_job(
    sessions: sessionmaker[Session], sqlite_url: str
) -> None:
    """A batch the ledger did not know took two of the job's three places; the producer's
    batch of two then has no room: the store refuses it whole and the rest of the job fails."""
    with scope(sessions) as session:
        batch = ledger.NewBatch(0, ["i0", "i1"], ["first", "second"], [0, 1])
        ledger.add_batches(session, "j", [batch, ledger.NewBatch(1, ["i2"], ["third"], [2])])
    runtime = fake_runtime(Settings(database_url=sqlite_url))
    assert run_message(raw(7, ["x0", "x1"], [0, 1]), runtime).state == Delivery.DONE
    outcome = run_message(raw(0, ["i0", "i1"], [0, 1]), runtime)
    assert outcome.state == Delivery.FAILED and outcome.finished
    job, stored, batches = ended(sessions)
    assert (job.state, job.done_items, job.failed_items) == ("partially_failed", 2, 1)
    assert job.error is not None and "batch 0 of job j does not fit its job" in job.error
    assert "has no room for 2 more items" in job.error
    assert (stored, batches) == (["x0", "x1"], {"done": 1, "failed": 2})
    with scope(sessions) as session:  # which of its items are real cannot be told
        assert session.query(FailedItem).count() == 0
