"""Raw batch messages, as an application without embedq sends them (``send_task`` by name, a job
row written by hand), reach the session's real worker process. Each malformed one ends its job
failed with a stored reason that names the problem, counting every item; one that names no
usable job is dropped with a log line; a well-formed one succeeds; and the worker stays up
throughout.
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
from tests.acceptance.conftest import Fleet
from tests.waiting import wait_until

Payload = dict[str, Any]
TEXTS = ["the first text of the job", "the second text of the job"]
IDS = ["a", "b"]
TIMEOUT = 60.0


@dataclass
class Raw:
    """The fleet's store and worker, and a way to send it raw messages."""

    fleet: Fleet
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

    def failed_ids(self, job_id: str) -> list[str]:
        with scope(session_factory(self.engine)) as session:
            found = session.scalars(select(FailedItem.item_id).where(FailedItem.job_id == job_id))
            return sorted(found)

    def wait_for_log(self, words: str, since: int) -> str:
        def seen() -> str | None:
            self.alive()
            return self.fleet.worker.logged(words, since)

        return wait_until(seen, TIMEOUT, f"the worker to log {words!r}", detail=self.log)

    def alive(self) -> None:
        assert self.fleet.worker.alive(), f"the worker died:\n{self.log()}"

    def log(self) -> str:
        return self.fleet.worker.tail()


@pytest.fixture
def raw(fleet: Fleet) -> Iterator[Raw]:
    """The session's worker, sent raw messages on its broker as an application would."""
    from worker.app import app

    connection = app.connection_for_write(fleet.broker_url)

    def send(payload: Payload) -> None:
        app.send_task("embedq.embed", args=[payload], queue="interactive", connection=connection)

    def send_together(payloads: list[Payload]) -> None:
        app.send_task(
            "embedq.embed_many", args=[payloads], queue="interactive", connection=connection
        )

    engine = make_engine(fleet.database_url)
    try:
        yield Raw(fleet, engine, send, send_together)
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
    pytest.param(  # past PostgreSQL's integer: its claim could not be asked; queued for good
        Breakage(setting("batch_index", 2**31), "batch_index: Input should be less than"),
        id="batch-index-past-the-column",
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


def test_a_batch_index_sent_again_with_other_items_fails_those_items(raw: Raw) -> None:
    """Two messages with batch index 0 and different items: the job waited for good (the
    second was skipped as a redelivery). Now the second's items fail with the reason and the
    job ends, the first's vectors stored."""
    job_id = str(uuid.uuid4())
    raw.insert_job(job_id, total=4)
    first = good(job_id)
    raw.send(first)
    second = good(job_id)
    second.update(item_ids=["c", "d"], positions=[2, 3])
    raw.send(second)
    job = raw.wait(job_id)
    assert (job["state"], job["done_items"], job["failed_items"]) == ("partially_failed", 2, 2)
    assert "already sent with other items" in job["error"]
    assert raw.failed_ids(job_id) == ["c", "d"]
    raw.alive()


def test_a_message_naming_another_model_than_its_job_fails_it(raw: Raw) -> None:
    """The job is for one model, the message names another this worker has: that model's
    vectors were stored under the job. Now the batch fails with the reason, nothing stored."""
    job_id = str(uuid.uuid4())
    raw.insert_job(job_id, total=len(TEXTS), model="bge-small")
    raw.send(good(job_id))  # names minilm
    job = raw.wait(job_id)
    assert (job["state"], job["failed_items"]) == ("failed", len(TEXTS))
    assert "it names model 'minilm', its job 'bge-small'" in job["error"]
    with raw.engine.connect() as connection:
        stored = connection.execute(
            text("SELECT count(*) FROM embeddings WHERE job_id = :j"), {"j": job_id}
        ).scalar()
    assert stored == 0
    raw.alive()


def test_a_message_for_a_job_that_ended_adds_nothing_to_it(raw: Raw) -> None:
    job_id = str(uuid.uuid4())
    raw.insert_job(job_id, total=len(TEXTS))
    raw.send(good(job_id))
    assert raw.wait(job_id)["state"] == "succeeded"
    since = len(raw.fleet.worker.lines)
    late = good(job_id)
    late.update(batch_index=1, item_ids=["c", "d"])  # past total_items, had it been stored
    raw.send(late)
    raw.wait_for_log("which has ended", since)
    with raw.engine.connect() as connection:
        stored = connection.execute(
            text("SELECT count(*) FROM embeddings WHERE job_id = :j"), {"j": job_id}
        ).scalar()
    assert stored == len(TEXTS)
    assert raw.job(job_id)["done_items"] == len(TEXTS)
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
    since = len(raw.fleet.worker.lines)
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
