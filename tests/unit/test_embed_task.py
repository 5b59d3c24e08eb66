import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage import ledger, repository, schema
from storage.models import Job
from storage.session import make_engine, scope, session_factory
from tasks.batches import embed_batch
from tasks.message import BatchMessage
from tests.fakes import FakeEngine


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    schema.upgrade(url)
    engine = make_engine(url)
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
        job = repository.get_job(session, "j")
        assert job is not None
        assert (job.state, job.done_items, job.failed_items) == ("succeeded", 3, 0)
        stored = repository.list_embeddings(session, "j")
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
        job = repository.get_job(session, "j")
        assert job is not None
        assert (job.state, job.done_items, job.failed_items) == ("failed", 0, 3)
        assert job.error is not None and "index 1 are empty or whitespace only" in job.error


def test_a_malformed_message_fails_its_items_with_a_readable_reason(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.batches import run_message
    from worker import lifecycle
    from worker.settings import get_settings

    monkeypatch.setenv("EMBEDQ_DATABASE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    get_settings.cache_clear()
    try:
        outcome = run_message({"job_id": "j", "batch_index": -1, "texts": ["a", "b", "c"]})
        dropped = run_message({"no": "job id"})
    finally:
        lifecycle.close()
    assert dropped.state == "dropped" and dropped.job_id is None
    assert outcome.state == "failed" and outcome.reason
    assert outcome.reason.startswith("malformed batch")
    with scope(sessions) as session:
        job = repository.get_job(session, "j")
        assert job is not None
        # Which items the broken batch carried cannot be told: the rest of the job fails.
        assert (job.state, job.failed_items) == ("failed", 3)
        assert job.error is not None and "batch_index" in job.error and "model" in job.error
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
    from tasks.batches import fail_batch

    batch = payload(["alpha", "beta gamma", "delta"])
    with scope(sessions) as session:
        ledger.add_batches(
            session, "j", [ledger.NewBatch(0, batch.item_ids, batch.texts, batch.positions)]
        )
    with scope(sessions) as session:
        assert embed_batch(session, FakeEngine(), batch, provider="FakeProvider").finished
    with scope(sessions) as session:
        late = fail_batch(session, batch, "worker process died 4 times on this batch")
        assert not late.finished
    with scope(sessions) as session:
        job = repository.get_job(session, "j")
        assert job is not None
        assert (job.state, job.done_items, job.failed_items) == ("succeeded", 3, 0)
        assert ledger.job_batches(session, "j") == {"done": 1}
