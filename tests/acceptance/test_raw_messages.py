"""Raw batch messages, as an application without embedq sends them (``send_task`` by name, a job
row written by hand), reach one real worker process. Each malformed one ends its job failed with
a stored reason that names the problem, counting every item; one that names no usable job is
dropped with a log line; a well-formed one succeeds; and the worker stays up throughout.

One worker serves the whole module (SQLite only) to keep the file fast.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from storage import ledger, schema
from storage.models import FailedItem
from storage.session import make_engine, scope, session_factory
from tests.acceptance.conftest import Worker
from tests.conftest import require
from tests.faults.services import PrivateRedis
from worker.settings import get_settings

pytestmark = pytest.mark.model

Payload = dict[str, Any]
TEXTS = ["the first text of the job", "the second text of the job"]
IDS = ["a", "b"]
TIMEOUT = 60.0


@dataclass
class Fleet:
    """The module's worker, its store, and a way to send it raw messages."""

    url: str
    worker: Worker
    send: Callable[[Payload], None]

    def insert_job(self, job_id: str, total: int, model: str = "minilm") -> None:
        """Write a job row as an application without embedq would: four columns, defaults for
        the rest (README, "Message format")."""
        with self.engine().begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO jobs (id, model_name, queue, total_items)"
                    " VALUES (:id, :model, 'interactive', :total)"
                ),
                {"id": job_id, "model": model, "total": total},
            )

    def add_batch(self, job_id: str) -> None:
        """The ledger row embedq's own producer would have written for batch 0 of the job."""
        with scope(session_factory(self.engine())) as session:
            batch = ledger.NewBatch(index=0, item_ids=IDS, texts=TEXTS, positions=[0, 1])
            ledger.add_batches(session, job_id, [batch])

    def engine(self) -> Any:
        if not hasattr(self, "_engine"):
            self._engine = make_engine(self.url)
        return self._engine

    def wait(self, job_id: str) -> dict[str, Any]:
        """The job's row once it is terminal (polled, at most ``TIMEOUT`` seconds)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            with self.engine().connect() as connection:
                row = (
                    connection.execute(
                        text(
                            "SELECT state, total_items, done_items, failed_items, error"
                            " FROM jobs WHERE id = :id"
                        ),
                        {"id": job_id},
                    )
                    .mappings()
                    .one()
                )
            if row["state"] in ("succeeded", "failed", "partially_failed"):
                return dict(row)
            self.alive()
            if time.monotonic() > deadline:
                pytest.fail(
                    f"job {job_id} not finished after {TIMEOUT:g}s: {dict(row)}\n{self.log()}"
                )
            time.sleep(0.1)

    def failed_ids(self, job_id: str) -> list[str]:
        with scope(session_factory(self.engine())) as session:
            found = session.scalars(select(FailedItem.item_id).where(FailedItem.job_id == job_id))
            return sorted(found)

    def wait_for_log(self, words: str, since: int) -> str:
        deadline = time.monotonic() + TIMEOUT
        while True:
            for line in self.worker.lines[since:]:
                if words in line:
                    return line
            self.alive()
            if time.monotonic() > deadline:
                pytest.fail(f"the worker never logged {words!r}:\n{self.log()}")
            time.sleep(0.1)

    def alive(self) -> None:
        assert self.worker.process.poll() is None, f"the worker died:\n{self.log()}"

    def log(self) -> str:
        return "".join(self.worker.lines[-40:])


@pytest.fixture(scope="module")
def fleet(
    minilm: Path, store_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """One worker for the module, on a Redis of its own (other runs flushing or consuming the
    shared test database cannot take its messages) and a SQLite file."""
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    folder = tmp_path_factory.mktemp("raw")
    broker = PrivateRedis(folder / "redis")
    broker.start()
    url = f"sqlite:///{folder / 'embedq.db'}"
    schema.upgrade(url)
    env = {
        "EMBEDQ_BROKER_URL": broker.url,
        "EMBEDQ_DATABASE_URL": url,
        "EMBEDQ_MODEL_DIR": str(store_root),
        "EMBEDQ_DEFAULT_MODEL": "minilm",
        "EMBEDQ_PROVIDERS": "CPUExecutionProvider",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        get_settings.cache_clear()
        from worker.app import app

        connection = app.connection_for_write(broker.url)

        def send(payload: Payload) -> None:
            app.send_task(
                "embedq.embed", args=[payload], queue="interactive", connection=connection
            )

        try:
            running = Worker(env, "embedq-raw")
        except BaseException:
            broker.kill()
            raise
        fleet = Fleet(url, running, send)
        try:
            yield fleet
        finally:
            running.stop()
            connection.release()
            broker.kill()
            fleet.engine().dispose()
            get_settings.cache_clear()


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
class Raw:
    """How a good message is broken, whether the job has its ledger row, and what the job's
    ``error`` must say."""

    breaks: Callable[[Payload], None]
    says: str
    ledger_row: bool = False


CASES = [
    pytest.param(Raw(without("texts"), "texts: Field required"), id="texts-missing"),
    pytest.param(
        Raw(without("texts"), "texts: Field required", ledger_row=True),
        id="texts-missing-with-ledger-row",
    ),
    pytest.param(
        Raw(setting("texts", []), "texts: List should have at least 1 item"), id="texts-empty"
    ),
    pytest.param(
        Raw(setting("texts", "one text"), "texts: Input should be a valid list"),
        id="texts-a-string",
    ),
    pytest.param(
        Raw(setting("texts", ["a text", 5]), "texts.1: Input should be a valid string"),
        id="text-not-a-string",
    ),
    pytest.param(
        Raw(setting("item_ids", ["a", "b", "c"]), "differ in length (2, 3, 2)"),
        id="more-item-ids-than-texts",
    ),
    pytest.param(
        Raw(setting("positions", [0]), "differ in length (2, 2, 1)", ledger_row=True),
        id="fewer-positions-than-texts",
    ),
    pytest.param(
        Raw(setting("batch_index", -1), "batch_index: Input should be greater than or equal to 0"),
        id="negative-batch-index",
    ),
    pytest.param(
        Raw(setting("batch_index", -1), "batch_index: Input", ledger_row=True),
        id="negative-batch-index-with-ledger-row",
    ),
    pytest.param(
        Raw(setting("model", "no-such-model"), "model no-such-model: "), id="unknown-model"
    ),
    pytest.param(
        Raw(setting("item_ids", ["a", "b\x00"]), r"id at index 1 'b\x00' holds a NUL"),
        id="item-id-with-nul",
    ),
    pytest.param(
        Raw(setting("item_ids", ["a", "b" * 201]), "is 201 characters, over 200"),
        id="item-id-over-200-chars",
    ),
    pytest.param(
        Raw(
            setting("texts", ["fine", "a \ud800 b"]),
            "texts: Value error, texts at index [1] hold lone surrogates",
        ),
        id="text-lone-surrogate",
    ),
    pytest.param(
        Raw(setting("positions", [5, 1]), "malformed batch: positions up to 5 in a job of 2 items"),
        id="positions-outside-the-job",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_a_malformed_message_fails_its_job_with_the_reason(fleet: Fleet, case: Raw) -> None:
    job_id = str(uuid.uuid4())
    fleet.insert_job(job_id, total=len(TEXTS))
    if case.ledger_row:
        fleet.add_batch(job_id)
    payload = good(job_id)
    case.breaks(payload)
    fleet.send(payload)
    job = fleet.wait(job_id)
    assert job["state"] == "failed"
    assert job["error"] is not None and case.says in job["error"], job["error"]
    assert (job["failed_items"], job["done_items"]) == (job["total_items"], 0)
    if case.ledger_row:
        assert fleet.failed_ids(job_id) == IDS
    fleet.alive()


def test_a_well_formed_message_succeeds(fleet: Fleet) -> None:
    job_id = str(uuid.uuid4())
    fleet.insert_job(job_id, total=len(TEXTS))
    fleet.send(good(job_id))
    job = fleet.wait(job_id)
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
    fleet: Fleet, breaks: Callable[[Payload], None], logged: str
) -> None:
    since = len(fleet.worker.lines)
    payload = good(str(uuid.uuid4()))  # never inserted: the store knows no such job
    breaks(payload)
    fleet.send(payload)
    line = fleet.wait_for_log(logged, since)
    assert "ERROR" in line or '"error"' in line.lower()
    fleet.alive()


def test_the_worker_is_still_up_and_serves_a_good_job_at_the_end(fleet: Fleet) -> None:
    fleet.alive()
    job_id = str(uuid.uuid4())
    fleet.insert_job(job_id, total=len(TEXTS))
    fleet.add_batch(job_id)
    fleet.send(good(job_id))
    job = fleet.wait(job_id)
    assert (job["state"], job["done_items"]) == ("succeeded", 2)
    fleet.alive()
