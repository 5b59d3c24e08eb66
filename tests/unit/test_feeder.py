"""The feeder (``tasks.feeder``): batches handed to it by many task threads share engine calls,
each still ends on its own in the store, and anything off the common path runs alone."""

from collections.abc import Sequence

import numpy as np
import pytest

from storage import embeddings
from storage.session import dispose_all, scope
from tasks import feeder, producer
from tasks.message import BatchMessage
from tasks.outcomes import Delivery, Outcome
from tests.fakes import FakeEngine, RecordingPublisher, fake_runtime, run_in_task_threads
from worker.engine import Encoding, Progress
from worker.settings import Settings


class CountingEngine(FakeEngine):
    """The fake engine, counting its calls and the texts of each."""

    def __init__(self) -> None:
        super().__init__(dim=8)
        self.calls: list[int] = []

    def encode(self, texts: Sequence[object], on_progress: Progress | None = None) -> Encoding:
        self.calls.append(len(texts))
        return super().encode(texts, on_progress)


def run_together(runtime: object, messages: list[BatchMessage]) -> list[Outcome]:
    """Each message from its own thread, as the threads pool's task threads hand them over."""
    ended = run_in_task_threads(runtime, messages)
    assert all(isinstance(outcome, Outcome) for outcome in ended), ended
    return [outcome for outcome in ended if isinstance(outcome, Outcome)]


@pytest.fixture
def settings(sqlite_url: str) -> Settings:
    return Settings(
        database_url=sqlite_url,
        default_model="fake",
        job_batch_size=4,
        in_flight=10,
        coalesce_wait_ms=300,  # generous: the threads below all arrive within it
    )


def test_one_text_jobs_from_many_threads_share_engine_calls_and_each_ends(
    settings: Settings,
) -> None:
    engine = CountingEngine()
    runtime = fake_runtime(settings, engine)
    sent = RecordingPublisher()
    texts = [f"text number {i}" for i in range(10)]
    handles = [producer.submit([t], settings=settings, publisher=sent) for t in texts]
    outcomes = run_together(runtime, sent.sent)
    assert [o.state for o in outcomes] == [Delivery.DONE] * 10
    assert all(o.finished for o in outcomes)  # each job settled by its own batch
    assert sum(engine.calls) == 10 and len(engine.calls) < 10  # some shared one call
    for handle, text in zip(handles, texts, strict=True):
        assert handle.status()["state"] == "succeeded"
        _, vectors = handle.embeddings()
        np.testing.assert_array_equal(vectors, FakeEngine(dim=8).encode([text]).vectors)
    dispose_all()


def test_a_redelivered_batch_is_skipped_and_a_refused_text_fails_alone(
    settings: Settings,
) -> None:
    runtime = fake_runtime(settings, CountingEngine())
    sent = RecordingPublisher()
    good = producer.submit(["alpha", "beta"], settings=settings, publisher=sent)
    mixed = producer.submit(["gamma", "\u200b\u200b"], settings=settings, publisher=sent)
    first = run_together(runtime, sent.sent)
    assert [o.state for o in first] == [Delivery.DONE, Delivery.DONE]
    again = run_together(runtime, sent.sent[:1])  # the first delivered a second time
    assert again[0].state == Delivery.SKIPPED
    assert good.status()["state"] == "succeeded"
    status = mixed.status()
    assert (status["state"], status["done"], status["failed"]) == (
        "partially_failed",
        1,
        1,
    )
    with scope(runtime.sessions) as session:
        assert embeddings.count_embeddings(session, good.id) == 2
        assert embeddings.count_embeddings(session, mixed.id) == 1
    dispose_all()


def test_split_gives_each_batch_its_rows_and_a_share_of_the_call() -> None:
    encoding = FakeEngine(dim=4).encode(["a b", "c", "d e f", "g"])
    parts = feeder.split(encoding, [1, 3])
    assert [p.stats.texts for p in parts] == [1, 3]
    np.testing.assert_array_equal(np.vstack([p.vectors for p in parts]), encoding.vectors)
    assert [p.token_counts for p in parts] == [(4,), (3, 5, 3)]
    assert sum(p.stats.inference_ms for p in parts) == pytest.approx(encoding.stats.inference_ms)


def test_messages_handed_over_together_share_one_call_and_a_broken_one_is_sent_back(
    settings: Settings,
) -> None:
    """``run_messages``, as ``embed_many`` calls it: the batches that parse go to the feeder
    at once (one engine call), the one that does not comes back ``RUN_ALONE``, in its place."""
    engine = CountingEngine()
    runtime = fake_runtime(settings, engine)
    sent = RecordingPublisher()
    first = producer.submit(["alpha"], settings=settings, publisher=sent)
    last = producer.submit(["omega"], settings=settings, publisher=sent)
    broken = {**sent.sent[0].body(), "positions": "not a list"}
    outcomes = feeder.run_messages([sent.sent[0].body(), broken, sent.sent[1].body()], runtime)
    assert outcomes[1] is feeder.RUN_ALONE
    assert [getattr(o, "state", o) for o in (outcomes[0], outcomes[2])] == [Delivery.DONE] * 2
    assert engine.calls == [2]
    assert (first.status()["state"], last.status()["state"]) == ("succeeded", "succeeded")
    dispose_all()
