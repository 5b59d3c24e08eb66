"""``producer.submit`` with its settings and publisher handed in: what it refuses before storing
anything, how it cuts a job into batches, and what it records when the broker cannot be
reached. (That importing it loads no inference library: tests/integration/test_light_imports.py.)
"""

from collections.abc import Sequence

import pytest

from storage import jobs, ledger
from storage.models import FailedItem, FailureKind
from storage.session import dispose_all, scope, sessions_for
from tasks import names, producer
from tasks.message import BatchMessage
from tests.fakes import RecordingPublisher
from worker.errors import InputError, UnavailableError
from worker.settings import Settings

NEVER_REACHED = "redis://127.0.0.1:1/0"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"texts": []}, "texts is empty"),
        ({"texts": ["a", ""]}, "whitespace only"),
        ({"texts": ["a", "b"], "ids": ["x", "x"]}, "ids must be unique"),
        ({"texts": ["a"], "model": None}, "EMBEDQ_DEFAULT_MODEL"),
    ],
)
def test_bad_submissions_are_refused_before_anything_is_stored(
    kwargs: dict[str, object], message: str
) -> None:
    settings = Settings(
        database_url="sqlite:////nonexistent/dir/never-created.db",
        broker_url=NEVER_REACHED,
        default_model=None,
    )
    kwargs.setdefault("model", "m")
    publisher = RecordingPublisher()
    with pytest.raises(InputError, match=message):
        producer.submit(**kwargs, settings=settings, publisher=publisher)  # type: ignore[arg-type]
    assert publisher.sent == []


def test_a_job_is_split_into_batches_of_similar_length_that_carry_the_input_order(
    sqlite_url: str,
) -> None:
    settings = Settings(database_url=sqlite_url, broker_url=NEVER_REACHED, job_batch_size=2)
    publisher = RecordingPublisher()
    texts = ["a" * 50, "b", "c" * 30, "d" * 5, "e" * 40]
    job = producer.submit(
        texts, model="m", ids=["A", "B", "C", "D", "E"], settings=settings, publisher=publisher
    )
    sent = [m.model_dump() for m in publisher.sent]
    assert [p["texts"] for p in sent] == [["b", "d" * 5], ["c" * 30, "e" * 40], ["a" * 50]]
    assert [p["item_ids"] for p in sent] == [["B", "D"], ["C", "E"], ["A"]]
    assert [p["positions"] for p in sent] == [[1, 3], [2, 4], [0]]
    assert [p["batch_index"] for p in sent] == [0, 1, 2]
    assert {p["job_id"] for p in sent} == {job.id} and {p["model"] for p in sent} == {"m"}
    assert publisher.queues == [names.Queue.INTERACTIVE] * 3
    with scope(sessions_for(sqlite_url)) as session:
        assert ledger.job_batches(session, job.id) == {"sent": 3}  # recorded before sending
        stored = jobs.get_job(session, job.id)
        assert stored is not None and stored.total_items == 5
    assert (job.settings, job.database_url, job.broker_url) == (settings, sqlite_url, NEVER_REACHED)
    producer.dispose()


def test_bulk_jobs_are_cut_at_the_bulk_batch_size_and_interactive_ones_are_not(
    sqlite_url: str,
) -> None:
    settings = Settings(
        database_url=sqlite_url, broker_url=NEVER_REACHED, job_batch_size=2, bulk_batch_size=5
    )
    publisher = RecordingPublisher()
    texts = [f"text {i}" for i in range(10)]
    producer.submit(texts, model="m", settings=settings, publisher=publisher)
    producer.submit(texts, model="m", queue="bulk", settings=settings, publisher=publisher)
    sizes = [len(m.texts) for m in publisher.sent]
    assert sizes == [2, 2, 2, 2, 2, 5, 5]
    assert publisher.queues == [names.Queue.INTERACTIVE] * 5 + [names.Queue.BULK] * 2
    assert Settings(job_batch_size=7).batch_size_for("bulk") == 7  # unset: the job size
    producer.dispose()


class Unreachable:
    """A broker that cannot be reached."""

    def publish(self, messages: Sequence[BatchMessage], queue: str) -> None:
        raise UnavailableError("the broker at redis://nowhere cannot be reached")


def test_a_job_whose_broker_cannot_be_reached_fails_its_items_as_unavailable(
    sqlite_url: str,
) -> None:
    settings = Settings(database_url=sqlite_url, broker_url=NEVER_REACHED, job_batch_size=2)
    with pytest.raises(UnavailableError, match="cannot be reached"):
        producer.submit(["a", "b", "c"], model="m", settings=settings, publisher=Unreachable())
    with scope(sessions_for(sqlite_url)) as session:
        (job,) = jobs.list_jobs(session)
        assert (job.state, job.failed_items, job.error_kind) == ("failed", 3, "unavailable")
        assert job.error is not None and job.error.startswith("not enqueued: ")
        assert ledger.job_batches(session, job.id) == {"failed": 2}
        kinds = {item.kind for item in session.query(FailedItem).all()}
        assert kinds == {FailureKind.UNAVAILABLE}
    dispose_all()
