"""Following a job through a fault, and the one line each scenario reports.

The store is read directly (never through the proxy a test may have stopped, never through the
Redis it may have killed): the job row, and the embeddings and failed items actually written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import text

from storage.models import JobState
from storage.session import make_engine
from tasks.producer import JobHandle
from tests.processes import Worker
from tests.waiting import wait_until

JOB_SIZE = 1000


def job_texts(short_texts: list[str], scenario: int) -> list[str]:
    """``JOB_SIZE`` texts of their own for the ``scenario``-th scenario."""
    return short_texts[scenario * JOB_SIZE : (scenario + 1) * JOB_SIZE]


def tail(*workers: Worker, lines: int = 40) -> str:
    """The end of each worker's log, for an assertion message."""
    return "\n".join(f"--- worker {w.process.pid}\n" + "".join(w.lines[-lines:]) for w in workers)


def finished(status: dict[str, Any]) -> bool:
    return JobState(status["state"]).finished


def wait_done(job: JobHandle, at_least: int, *workers: Worker, timeout: float = 300) -> None:
    """Block until ``at_least`` items of ``job`` are stored: the moment to strike mid-job."""

    def reached() -> dict[str, Any] | None:
        status = dict(job.status())
        return status if status["done"] >= at_least or finished(status) else None

    status = wait_until(
        reached, timeout, f"{at_least} items of job {job.id}", detail=lambda: tail(*workers)
    )
    if finished(status):
        pytest.fail(f"the job finished before the fault: {status}")


def wait_terminal(job: JobHandle, timeout: float, stall: float = 60) -> dict[str, Any]:
    """The job's status once it is succeeded, failed or partially failed, or as it stands when
    ``timeout`` runs out or nothing moved for ``stall`` seconds (the report still says what
    happened; the test's asserts judge it)."""
    deadline = time.monotonic() + timeout
    moved, last = time.monotonic(), None
    while True:
        status = job.status()
        now = time.monotonic()
        if (status["done"], status["failed"]) != last:
            moved, last = now, (status["done"], status["failed"])
        if finished(status) or now > deadline or now - moved > stall:
            return status
        time.sleep(0.1)


@dataclass(frozen=True)
class Outcome:
    """What a fault left in the store for one job."""

    scenario: str
    submitted: int
    stored: int
    """Distinct items with a vector."""
    duplicated: int
    """Embedding rows beyond one per item."""
    failed: int
    """Distinct items recorded failed."""
    state: str
    seconds: float
    """From submit to a terminal state (or to giving up waiting)."""
    note: str = ""
    """What the scenario saw of the fault itself (kills, re-publishes, the error)."""

    @property
    def lost(self) -> int:
        """Items neither stored nor failed: silently dropped."""
        return self.submitted - self.stored - self.failed

    @property
    def verdict(self) -> tuple[str, int, int, int]:
        """(state, stored, duplicated, lost): what every scenario asserts."""
        return (self.state, self.stored, self.duplicated, self.lost)

    def line(self) -> str:
        return (
            f"{self.scenario}: submitted={self.submitted} stored={self.stored}"
            f" duplicated={self.duplicated} lost={self.lost} failed={self.failed}"
            f" state={self.state} seconds={self.seconds:.1f}"
            + (f" ({self.note})" if self.note else "")
        )


def measure(
    scenario: str, database_url: str, job_id: str, submitted: int, seconds: float, note: str = ""
) -> Outcome:
    database = make_engine(database_url)
    try:
        with database.connect() as connection:
            rows, distinct = connection.execute(
                text("SELECT count(*), count(DISTINCT item_id) FROM embeddings WHERE job_id = :j"),
                {"j": job_id},
            ).one()
            failed = connection.execute(
                text("SELECT count(DISTINCT item_id) FROM failed_items WHERE job_id = :j"),
                {"j": job_id},
            ).scalar_one()
            state = connection.execute(
                text("SELECT state FROM jobs WHERE id = :j"), {"j": job_id}
            ).scalar()
    finally:
        database.dispose()
    return Outcome(
        scenario,
        submitted,
        int(distinct),
        int(rows) - int(distinct),
        int(failed),
        str(state),
        seconds,
        note,
    )


def ledger_row(database_url: str, job_id: str, batch_index: int) -> dict[str, Any]:
    database = make_engine(database_url)
    try:
        with database.connect() as connection:
            row = connection.execute(
                text("SELECT * FROM batches WHERE job_id = :j AND batch_index = :i"),
                {"j": job_id, "i": batch_index},
            ).one()
            return dict(row._mapping)
    finally:
        database.dispose()


def claimed(database_url: str, job_id: str) -> tuple[int, str] | None:
    """A batch of ``job_id`` a worker has claimed and not yet finished (it is running), and
    the worker ("host:pid") that runs it."""
    database = make_engine(database_url)
    try:
        with database.connect() as connection:
            row = connection.execute(
                text(
                    "SELECT batch_index, worker FROM batches WHERE job_id = :j"
                    " AND state = 'sent' AND attempts > 0 ORDER BY updated_at DESC"
                ),
                {"j": job_id},
            ).first()
    finally:
        database.dispose()
    return None if row is None else (int(row[0]), str(row[1]))


def running_batches(database_url: str, job_id: str) -> list[int]:
    """The batches of ``job_id`` claimed and not finished: the ones a worker holds."""
    return scalar_rows(
        database_url,
        "SELECT batch_index FROM batches WHERE job_id = :j AND state = 'sent' AND attempts > 0"
        " ORDER BY batch_index",
        j=job_id,
    )


def scalar_rows(database_url: str, sql: str, **params: Any) -> list[Any]:
    database = make_engine(database_url)
    try:
        with database.connect() as connection:
            return list(connection.execute(text(sql), params).scalars())
    finally:
        database.dispose()


def wait_claimed(
    database_url: str, job: JobHandle, *workers: Worker, timeout: float = 30
) -> tuple[int, str]:
    """Block until a batch of ``job`` is running: the moment to strike mid-batch."""
    return wait_until(
        lambda: claimed(database_url, job.id),
        timeout,
        f"a running batch of job {job.id}",
        every=0.005,
        detail=lambda: f"{job.status()}\n{tail(*workers)}",
    )


def scalar(database_url: str, sql: str, **params: Any) -> Any:
    database = make_engine(database_url)
    try:
        with database.connect() as connection:
            return connection.execute(text(sql), params).scalar()
    finally:
        database.dispose()
