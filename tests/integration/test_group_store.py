"""A group of batches stored by one call (``storage.batch_results.store_group``, the feeder's
write) on each store: every batch ends on its own, a job's state settles with its last batch,
a batch already ended writes nothing, the bulk write is the store's own (COPY on
PostgreSQL), and a group with a batch its job has no room for stores nothing."""

import time
from datetime import UTC, datetime

import numpy as np
import pytest

from storage import batch_results, batch_stats, embeddings, jobs, ledger
from storage.models import BatchStat
from storage.session import dispose_all, scope, sessions_for
from tasks import outcomes, producer
from tests.fakes import FakeEngine, RecordingPublisher
from worker.settings import Settings


def test_a_group_of_batches_of_several_jobs_is_stored_in_one_call(database_url: str) -> None:
    settings = Settings(database_url=database_url, default_model="fake", job_batch_size=2)
    sent = RecordingPublisher()
    singles = [
        producer.submit([f"one text {i}"], settings=settings, publisher=sent) for i in range(3)
    ]
    multi = producer.submit(["a b", "c d", "e f"], settings=settings, publisher=sent)
    messages = sent.sent  # 3 one-text batches, then the job of two batches
    engine = FakeEngine(dim=16)
    now = time.time()
    finished = [
        outcomes.finished_batch(m, engine.encode(m.texts), {}, "FakeProvider", now, "ab" * 32, "h")
        for m in messages
    ]
    sessions = sessions_for(database_url)
    with scope(sessions) as session:
        claimed, facts = ledger.claim_many(
            session, [(m.job_id, m.batch_index) for m in messages], "h:1"
        )
    assert len(claimed) == 5 and facts[multi.id].total == 3
    with scope(sessions) as session:
        stored = batch_results.store_group(session, finished[:4])  # the multi job's first batch
    assert [s.stored for s in stored] == [1, 1, 1, 2]
    assert [s.status is not None for s in stored] == [True, True, True, False]
    with scope(sessions) as session:
        again = batch_results.store_group(session, finished[3:])  # a redelivery and the last
    assert [(s.stored, s.status is not None) for s in again] == [(0, False), (1, True)]
    for handle, texts in zip(
        [*singles, multi],
        [[f"one text {i}"] for i in range(3)] + [["a b", "c d", "e f"]],
        strict=True,
    ):
        status = handle.status()
        assert (status["state"], status["done"]) == ("succeeded", len(texts))
        _, vectors = handle.embeddings()
        np.testing.assert_array_equal(vectors, engine.encode(texts).vectors)
    with scope(sessions) as session:
        assert session.query(BatchStat).count() == 5
        assert embeddings.count_embeddings(session, multi.id) == 3
        busy = batch_stats.engine_busy(session, datetime.now(UTC))
        assert [(b.host, b.batches) for b in busy] == [("h", 5)]
    dispose_all()


def test_a_bulk_write_that_meets_a_stored_item_falls_back_to_the_upsert(database_url: str) -> None:
    """Two batches of one job that name one item (an application's messages can): the second
    batch's COPY (or executemany) meets the stored row, and its savepoint sends it to the
    upsert, which stores the rest."""
    settings = Settings(database_url=database_url, default_model="fake", job_batch_size=40)
    sent = RecordingPublisher()
    texts = [f"text {i}" for i in range(80)]
    job = producer.submit(texts, settings=settings, publisher=sent)
    first, second = sent.sent
    clash = second.model_copy(update={"item_ids": [first.item_ids[0], *second.item_ids[1:]]})
    engine = FakeEngine(dim=16)
    sessions = sessions_for(database_url)
    stored = []
    for message in (first, clash):
        done = outcomes.finished_batch(message, engine.encode(message.texts), {}, "F", 0.0)
        assert len(done.rows) >= batch_results.BULK_FROM
        with scope(sessions) as session:
            stored.append(batch_results.store_finished(session, done).stored)
    assert stored == [40, 39]
    with scope(sessions) as session:
        assert embeddings.count_embeddings(session, job.id) == 79
    dispose_all()


def test_a_small_group_is_one_upsert_that_counts_each_batch_s_new_rows(database_url: str) -> None:
    """A group too small for the bulk write goes in by one upsert for all its batches: a batch
    naming an item already stored is counted for the rows it did add, the others in full."""
    settings = Settings(database_url=database_url, default_model="fake", job_batch_size=2)
    sent = RecordingPublisher()
    job = producer.submit([f"text {i}" for i in range(6)], settings=settings, publisher=sent)
    first, second, third = sent.sent
    clash = second.model_copy(update={"item_ids": [first.item_ids[0], second.item_ids[1]]})
    engine = FakeEngine(dim=16)
    finished = [
        outcomes.finished_batch(m, engine.encode(m.texts), {}, "F", 0.0)
        for m in (first, clash, third)
    ]
    sessions = sessions_for(database_url)
    with scope(sessions) as session:
        assert [s.stored for s in batch_results.store_group(session, finished[:1])] == [2]
    with scope(sessions) as session:
        stored = batch_results.store_group(session, finished[1:])
    assert [s.stored for s in stored] == [1, 2]
    with scope(sessions) as session:
        assert embeddings.count_embeddings(session, job.id) == 5
    assert job.status()["done"] == 5
    dispose_all()


def test_a_group_with_a_batch_its_job_has_no_room_for_stores_nothing(database_url: str) -> None:
    """A batch the ledger did not know filled a one-text job: that job's own batch, stored
    in a group, has no room, so the whole group's transaction stores nothing (the feeder then
    runs each batch alone) and the job keeps its one vector."""
    settings = Settings(database_url=database_url, default_model="fake", job_batch_size=2)
    sent = RecordingPublisher()
    other, full = (
        producer.submit([f"one text {i}"], settings=settings, publisher=sent) for i in (0, 1)
    )
    first, own = sent.sent
    stray = own.model_copy(update={"batch_index": 9, "item_ids": ["stray"]})
    engine = FakeEngine(dim=16)
    group = [outcomes.finished_batch(m, engine.encode(m.texts), {}, "F", 0.0) for m in (first, own)]
    sessions = sessions_for(database_url)
    with scope(sessions) as session:
        done = outcomes.finished_batch(stray, engine.encode(stray.texts), {}, "F", 0.0)
        assert batch_results.store_finished(session, done).stored == 1
    assert full.status()["state"] == "succeeded"
    with pytest.raises(jobs.OverfullJobError), scope(sessions) as session:
        batch_results.store_group(session, group)
    with scope(sessions) as session:
        assert embeddings.count_embeddings(session, other.id) == 0
        assert ledger.batch_state(session, other.id, 0) == "sent"
        assert [s.stored for s in batch_results.store_group(session, group[:1])] == [1]
    assert other.status()["state"] == "succeeded"
    with scope(sessions) as session:
        assert [e.item_id for e in embeddings.list_embeddings(session, full.id)] == ["stray"]
    dispose_all()
