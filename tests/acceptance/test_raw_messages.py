"""Raw batch messages, as an application without embedq sends them (``send_task`` by name, a job
row written by hand), reach the session's real worker process. Each malformed one ends its job
failed with a stored reason that names the problem, counting every item; one that names no
usable job is dropped with a log line; a well-formed one succeeds; and the worker stays up
throughout.

So do messages a buggy or hostile producer could send that are well formed but do not fit the
store: a batch index past the ledger's integer column, a batch index sent again with other
items, a message for a job that had ended, one naming another model than its job. Each ends its
job with a stored reason (or, for a job that had ended, is recorded refused on the ledger),
nothing is stored past the job's total or under the wrong model, and a good job sent afterwards
succeeds: on the fleet's prefork worker (``embedq.embed``, on both stores) and on a threads-pool
worker whose feeder takes them gathered (``embedq.embed_many``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, select, text

from storage import ledger
from storage.models import FailedItem
from storage.session import make_engine, scope, session_factory
from tests.acceptance.conftest import Fleet, Worker
from tests.processes import celery_worker
from tests.waiting import wait_until

Payload = dict[str, Any]
TEXTS = ["the first text of the job", "the second text of the job"]
IDS = ["a", "b"]
TIMEOUT = 60.0


@dataclass
class Raw:
    """A worker and its store, and a way to send it raw messages."""

    worker: Worker
    engine: Engine
    send: Callable[[Payload], None]
    send_together: Callable[[list[Payload]], None]
    """Several batch messages as one ``embed_many`` message, as embedq's gatherer sends them."""

    def insert_job(self, job_id: str, total: int, model: str = "minilm") -> None:
        """Write a job row as an application without embedq would: four columns, defaults for
        the rest (README, "Message format")."""
        with self.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO jobs (id, model_name, queue, total_items)"
                    " VALUES (:id, :model, 'interactive', :total)"
                ),
                {"id": job_id, "model": model, "total": total},
            )

    def add_batch(self, job_id: str) -> None:
        """The ledger row embedq's own producer would have written for batch 0 of the job."""
        with scope(session_factory(self.engine)) as session:
            batch = ledger.NewBatch(index=0, item_ids=IDS, texts=TEXTS, positions=[0, 1])
            ledger.add_batches(session, job_id, [batch])

    def job(self, job_id: str) -> dict[str, Any]:
        with self.engine.connect() as connection:
            row = connection.execute(
                text(
                    "SELECT state, total_items, done_items, failed_items, error, error_kind"
                    " FROM jobs WHERE id = :id"
                ),
                {"id": job_id},
            )
            return dict(row.mappings().one())

    def wait(self, job_id: str) -> dict[str, Any]:
        """The job's row once it is terminal (at most ``TIMEOUT`` seconds)."""

        def ended() -> dict[str, Any] | None:
            self.alive()
            job = self.job(job_id)
            return job if job["state"] in ("succeeded", "failed", "partially_failed") else None

        return wait_until(ended, TIMEOUT, f"job {job_id} to end", every=0.1, detail=self.log)

    def stored_ids(self, job_id: str) -> list[str]:
        """The items the job holds vectors for."""
        with self.engine.connect() as connection:
            found = connection.execute(
                text("SELECT item_id FROM embeddings WHERE job_id = :id ORDER BY item_id"),
                {"id": job_id},
            )
            return list(found.scalars())

    def refused(self, job_id: str, index: int) -> dict[str, Any]:
        """The ledger's row of a batch once a reason is recorded on it (at most ``TIMEOUT``)."""

        def recorded() -> dict[str, Any] | None:
            self.alive()
            with self.engine.connect() as connection:
                row = connection.execute(
                    text(
                        "SELECT state, last_error FROM batches"
                        " WHERE job_id = :id AND batch_index = :index"
                    ),
                    {"id": job_id, "index": index},
                ).first()
            return None if row is None or row.last_error is None else dict(row._mapping)

        return wait_until(recorded, TIMEOUT, f"batch {index} of {job_id} refused", detail=self.log)

    def serves_a_good_job(self) -> None:
        """A well-formed job sent now succeeds: the worker goes on."""
        job_id = str(uuid.uuid4())
        self.insert_job(job_id, total=len(TEXTS))
        self.send(good(job_id))
        job = self.wait(job_id)
        assert (job["state"], job["done_items"], job["error"]) == ("succeeded", 2, None)
        assert self.stored_ids(job_id) == IDS

    def failed_ids(self, job_id: str) -> list[str]:
        with scope(session_factory(self.engine)) as session:
            found = session.scalars(select(FailedItem.item_id).where(FailedItem.job_id == job_id))
            return sorted(found)

    def wait_for_log(self, words: str, since: int) -> str:
        def seen() -> str | None:
            self.alive()
            return self.worker.logged(words, since)

        return wait_until(seen, TIMEOUT, f"the worker to log {words!r}", detail=self.log)

    def alive(self) -> None:
        assert self.worker.alive(), f"the worker died:\n{self.log()}"

    def log(self) -> str:
        return self.worker.tail()


@pytest.fixture
def raw(fleet: Fleet) -> Iterator[Raw]:
    """The session's worker, sent raw messages on its broker as an application would."""
    yield from raw_messages(fleet.worker, fleet.database_url, fleet.broker_url)


def raw_messages(worker: Worker, database_url: str, broker_url: str) -> Iterator[Raw]:
    from worker.app import app

    connection = app.connection_for_write(broker_url)

    def send(payload: Payload) -> None:
        app.send_task("embedq.embed", args=[payload], queue="interactive", connection=connection)

    def send_together(payloads: list[Payload]) -> None:
        app.send_task(
            "embedq.embed_many", args=[payloads], queue="interactive", connection=connection
        )

    engine = make_engine(database_url)
    try:
        yield Raw(worker, engine, send, send_together)
    finally:
        connection.release()
        engine.dispose()


def good(job_id: str) -> Payload:
    return {
        "job_id": job_id,
        "batch_index": 0,
        "model": "minilm",
        "texts": list(TEXTS),
        "item_ids": list(IDS),
        "positions": [0, 1],
        "enqueued_at": time.time(),
    }


def without(key: str) -> Callable[[Payload], None]:
    return lambda payload: payload.pop(key) and None


def setting(key: str, value: object) -> Callable[[Payload], None]:
    return lambda payload: payload.update({key: value})


@dataclass(frozen=True)
class Breakage:
    """How a good message is broken, whether the job has its ledger row, and what the job's
    ``error`` must say."""

    breaks: Callable[[Payload], None]
    says: str
    ledger_row: bool = False
    kind: str = "input"


CASES = [
    pytest.param(Breakage(without("texts"), "texts: Field required"), id="texts-missing"),
    pytest.param(
        Breakage(without("texts"), "texts: Field required", ledger_row=True),
        id="texts-missing-with-ledger-row",
    ),
    pytest.param(
        Breakage(setting("texts", []), "texts: List should have at least 1 item"), id="texts-empty"
    ),
    pytest.param(
        Breakage(setting("texts", "one text"), "texts: Input should be a valid list"),
        id="texts-a-string",
    ),
    pytest.param(
        Breakage(setting("texts", ["a text", 5]), "texts.1: Input should be a valid string"),
        id="text-not-a-string",
    ),
    pytest.param(
        Breakage(setting("item_ids", ["a", "b", "c"]), "differ in length (2, 3, 2)"),
        id="more-item-ids-than-texts",
    ),
    pytest.param(
        Breakage(setting("positions", [0]), "differ in length (2, 2, 1)", ledger_row=True),
        id="fewer-positions-than-texts",
    ),
    pytest.param(
        Breakage(
            setting("batch_index", -1), "batch_index: Input should be greater than or equal to 0"
        ),
        id="negative-batch-index",
    ),
    pytest.param(
        Breakage(setting("batch_index", -1), "batch_index: Input", ledger_row=True),
        id="negative-batch-index-with-ledger-row",
    ),
    pytest.param(
        Breakage(setting("model", "no-such-model"), "model no-such-model: ", kind="model"),
        id="unknown-model",
    ),
    pytest.param(
        Breakage(setting("item_ids", ["a", "b\x00"]), r"id at index 1 'b\x00' holds a NUL"),
        id="item-id-with-nul",
    ),
    pytest.param(
        Breakage(setting("item_ids", ["a", "b" * 201]), "is 201 characters, over 200"),
        id="item-id-over-200-chars",
    ),
    pytest.param(
        Breakage(
            setting("texts", ["fine", "a \ud800 b"]),
            "texts: Value error, texts at index [1] hold lone surrogates",
        ),
        id="text-lone-surrogate",
    ),
    pytest.param(
        Breakage(
            setting("positions", [5, 1]), "malformed batch: positions up to 5 in a job of 2 items"
        ),
        id="positions-outside-the-job",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_a_malformed_message_fails_its_job_with_the_reason(raw: Raw, case: Breakage) -> None:
    job_id = str(uuid.uuid4())
    raw.insert_job(job_id, total=len(TEXTS))
    if case.ledger_row:
        raw.add_batch(job_id)
    payload = good(job_id)
    case.breaks(payload)
    raw.send(payload)
    job = raw.wait(job_id)
    assert job["state"] == "failed"
    assert job["error"] is not None and case.says in job["error"], job["error"]
    assert (job["failed_items"], job["done_items"]) == (job["total_items"], 0)
    assert job["error_kind"] == case.kind
    if case.ledger_row:
        assert raw.failed_ids(job_id) == IDS
    raw.alive()


def test_a_well_formed_message_succeeds(raw: Raw) -> None:
    job_id = str(uuid.uuid4())
    raw.insert_job(job_id, total=len(TEXTS))
    raw.send(good(job_id))
    job = raw.wait(job_id)
    assert (job["state"], job["done_items"], job["failed_items"], job["error"]) == (
        "succeeded",
        2,
        0,
        None,
    )


DROPPED = [
    pytest.param(setting("job_id", "j" * 37), "dropped a batch message", id="job-id-over-36-chars"),
    pytest.param(without("job_id"), "dropped a batch message", id="job-id-missing"),
    pytest.param(setting("job_id", 42), "dropped a batch message", id="job-id-a-number"),
    pytest.param(lambda payload: None, "which is not in the store", id="job-not-in-the-store"),
]


@pytest.mark.parametrize(("breaks", "logged"), DROPPED)
def test_a_message_without_a_usable_job_is_dropped_with_a_log_line(
    raw: Raw, breaks: Callable[[Payload], None], logged: str
) -> None:
    since = len(raw.worker.lines)
    payload = good(str(uuid.uuid4()))  # never inserted: the store knows no such job
    breaks(payload)
    raw.send(payload)
    line = raw.wait_for_log(logged, since)
    assert "ERROR" in line or '"error"' in line.lower()
    raw.alive()


def test_a_broken_batch_among_gathered_ones_fails_alone_and_the_others_succeed(raw: Raw) -> None:
    """One ``embed_many`` message of three one-batch jobs, the middle one malformed: it ends
    failed with its reason, the other two succeed, the worker stays up."""
    first, broken, last = (str(uuid.uuid4()) for _ in range(3))
    for job_id in (first, broken, last):
        raw.insert_job(job_id, total=len(TEXTS))
        raw.add_batch(job_id)
    bad = good(broken)
    bad["positions"] = [5, 1]
    raw.send_together([good(first), bad, good(last)])
    for job_id in (first, last):
        assert (raw.wait(job_id)["state"], raw.job(job_id)["done_items"]) == ("succeeded", 2)
    failed = raw.wait(broken)
    assert failed["state"] == "failed" and "positions up to 5" in failed["error"]
    assert raw.failed_ids(broken) == IDS
    raw.alive()


def test_the_worker_is_still_up_and_serves_a_good_job_at_the_end(raw: Raw) -> None:
    raw.alive()
    job_id = str(uuid.uuid4())
    raw.insert_job(job_id, total=len(TEXTS))
    raw.add_batch(job_id)
    raw.send(good(job_id))
    job = raw.wait(job_id)
    assert (job["state"], job["done_items"]) == ("succeeded", 2)
    raw.alive()


# --- well formed, but not fitting the store: a buggy or hostile producer -------------------------
BOTH_STORES = pytest.mark.parametrize("fleet", ["sqlite", "postgresql"], indirect=True)
PAST_THE_COLUMN = 2**31
"""A batch index PostgreSQL's ``integer`` cannot hold: its claim could not be asked, and the job
stayed queued for good with nothing overdue. SQLite could hold it; it is held to the same
bound."""


def says(job: dict[str, Any], words: str) -> None:
    assert job["error"] is not None and words in job["error"], job["error"]


@BOTH_STORES
def test_a_batch_index_past_the_ledger_s_column_fails_its_job(raw: Raw) -> None:
    job_id = str(uuid.uuid4())
    raw.insert_job(job_id, total=len(TEXTS))
    raw.send({**good(job_id), "batch_index": PAST_THE_COLUMN})
    job = raw.wait(job_id)
    assert (job["state"], job["done_items"], job["failed_items"]) == ("failed", 0, 2)
    says(job, "batch_index: Input should be less than or equal to 2147483647")
    assert job["error_kind"] == "input"
    assert raw.stored_ids(job_id) == []
    raw.serves_a_good_job()


@BOTH_STORES
def test_a_batch_index_sent_again_with_other_items_fails_those_items(raw: Raw) -> None:
    """Two messages with batch index 0 and different items: the second was skipped as a
    redelivery and the job waited for good. Now the second's items fail with the reason and
    the job ends, the first's vectors stored."""
    job_id = str(uuid.uuid4())
    raw.insert_job(job_id, total=4)
    raw.send(good(job_id))
    raw.send({**good(job_id), "item_ids": ["c", "d"], "positions": [2, 3]})
    job = raw.wait(job_id)
    assert (job["state"], job["done_items"], job["failed_items"]) == ("partially_failed", 2, 2)
    says(job, f"batch 0 of job {job_id} was already sent with other items")
    assert (raw.stored_ids(job_id), raw.failed_ids(job_id)) == (IDS, ["c", "d"])
    raw.serves_a_good_job()


@BOTH_STORES
def test_a_message_for_a_job_that_ended_is_refused_and_recorded(raw: Raw) -> None:
    """A new batch index, and the job's own index with other items, after the job succeeded:
    they added vectors past its total. Now each is refused, its reason recorded on the
    ledger, and the job keeps what it had."""
    job_id = str(uuid.uuid4())
    raw.insert_job(job_id, total=len(TEXTS))
    raw.send(good(job_id))
    assert raw.wait(job_id)["state"] == "succeeded"
    raw.send({**good(job_id), "batch_index": 1, "item_ids": ["c", "d"]})
    raw.send({**good(job_id), "item_ids": ["a", "e"]})
    late, reused = raw.refused(job_id, 1), raw.refused(job_id, 0)
    assert (reused["state"], late["state"]) == ("done", "failed")
    for row, index in ((reused, 0), (late, 1)):
        assert f"batch {index} of job {job_id} came after its job had ended" in row["last_error"]
    job = raw.job(job_id)
    assert (job["state"], job["done_items"], job["failed_items"], job["error"]) == (
        "succeeded",
        2,
        0,
        None,
    )
    assert (raw.stored_ids(job_id), raw.failed_ids(job_id)) == (IDS, [])
    raw.serves_a_good_job()


@BOTH_STORES
def test_a_message_naming_another_model_than_its_job_stores_nothing(raw: Raw) -> None:
    """The job is for one model, the message names another this worker has: that model's
    vectors were stored under the job. Now the batch fails with the reason."""
    job_id = str(uuid.uuid4())
    raw.insert_job(job_id, total=len(TEXTS), model="bge-small")
    raw.send(good(job_id))  # names minilm
    job = raw.wait(job_id)
    assert (job["state"], job["done_items"], job["failed_items"]) == ("failed", 0, 2)
    says(job, "malformed batch: it names model 'minilm', its job 'bge-small'")
    assert (raw.stored_ids(job_id), raw.failed_ids(job_id)) == ([], IDS)
    raw.serves_a_good_job()


@pytest.fixture
def threaded(pipeline_env: dict[str, str], database_url: str) -> Iterator[Raw]:
    """A threads-pool worker of this test's own, whose feeder claims and runs gathered
    batches together (``EMBEDQ_IN_FLIGHT`` > 1)."""
    command = celery_worker("raw-threads", processes=4, pool="threads")
    worker = Worker({**pipeline_env, "EMBEDQ_IN_FLIGHT": "4"}, "raw-threads", command)
    try:
        yield from raw_messages(worker, database_url, pipeline_env["EMBEDQ_BROKER_URL"])
    finally:
        worker.stop()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_messages_that_do_not_fit_their_jobs_end_them_gathered_on_the_feeder(
    threaded: Raw,
) -> None:
    """The rows above in one ``embed_many`` message to a threads-pool worker, beside a good
    batch: the feeder's claim checks each against what it read (two with ledger rows it
    claims: another model, other items than the pending batch's), and each ends as alone."""
    raw = threaded
    names = ("index", "again", "ended", "model", "items", "ok")
    jobs = {name: str(uuid.uuid4()) for name in names}
    for name, job_id in jobs.items():
        model = "bge-small" if name == "model" else "minilm"
        raw.insert_job(job_id, total=4 if name == "again" else 2, model=model)
    for name in ("model", "items", "ok"):  # batches embedq's producer recorded: claimed together
        raw.add_batch(jobs[name])
    for name in ("again", "ended"):
        raw.send(good(jobs[name]))
    assert raw.wait(jobs["ended"])["state"] == "succeeded"
    wait_until(lambda: raw.stored_ids(jobs["again"]) == IDS, TIMEOUT, "the first of batch 0")
    raw.send_together(
        [
            {**good(jobs["index"]), "batch_index": PAST_THE_COLUMN},
            {**good(jobs["again"]), "item_ids": ["c", "d"], "positions": [2, 3]},
            {**good(jobs["ended"]), "batch_index": 1, "item_ids": ["c", "d"]},
            good(jobs["model"]),
            {**good(jobs["items"]), "item_ids": ["x", "y"]},
            good(jobs["ok"]),
        ]
    )
    expected = {
        "index": ("failed", 0, 2, [], "less than or equal to 2147483647"),
        "again": ("partially_failed", 2, 2, IDS, "was already sent with other items"),
        "model": ("failed", 0, 2, [], "it names model 'minilm', its job 'bge-small'"),
        "items": ("failed", 0, 2, [], "was already sent with other items"),
    }
    for name, (state, done, failed, stored, words) in expected.items():
        job = raw.wait(jobs[name])
        assert (job["state"], job["done_items"], job["failed_items"]) == (state, done, failed)
        says(job, words)
        assert raw.stored_ids(jobs[name]) == stored, name
    assert raw.wait(jobs["ok"])["state"] == "succeeded"
    late = raw.refused(jobs["ended"], 1)
    assert late["state"] == "failed" and "came after its job had ended" in late["last_error"]
    assert (raw.job(jobs["ended"])["done_items"], raw.stored_ids(jobs["ended"])) == (2, IDS)
    raw.serves_a_good_job()
    raw.alive()
