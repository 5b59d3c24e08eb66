"""Worker processes die under a job: a pool child, the whole worker, a polite stop, and a batch
that kills whoever runs it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
from sqlalchemy import text

from storage.session import make_engine
from tests.faults.conftest import BATCH_SIZE
from tests.faults.outcomes import (
    JOB_SIZE,
    Outcome,
    finished,
    job_texts,
    ledger_row,
    running_batches,
    tail,
    wait_claimed,
    wait_done,
    wait_terminal,
)
from tests.faults.services import PoisonKiller, children
from tests.processes import Worker
from tests.waiting import wait_until


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_batch_that_kills_its_worker_every_time_fails_alone_and_the_worker_goes_on(
    start_worker: Callable[..., Worker],
    short_texts: list[str],
    database_url: str,
    report: Callable[..., Outcome],
) -> None:
    from tasks import producer

    worker = start_worker("poison")
    texts = job_texts(short_texts, 3)  # twenty batches; the sixth is poison
    poison = 5
    started = time.monotonic()
    job = producer.submit(texts)
    with PoisonKiller(database_url, job.id, poison, worker.process.pid) as killer:
        status = wait_terminal(job, 240)
    row = ledger_row(database_url, job.id, poison)
    note = f"{len(killer.killed)} kills; batch {poison}: {row['last_error']}"
    outcome = report(job.id, len(texts), time.monotonic() - started, note=note)

    assert killer.error is None, killer.error
    assert (outcome.state, outcome.stored, outcome.failed, outcome.lost) == (
        "partially_failed",
        JOB_SIZE - row["item_count"],
        row["item_count"],
        0,
    ), (status, row, tail(worker))
    assert row["state"] == "failed" and "worker process died" in row["last_error"], row
    assert len(killer.killed) == row["attempts"] >= 2, (killer.killed, row)  # every claim died
    database = make_engine(database_url)
    with database.connect() as connection:
        states: dict[str, int] = dict(
            connection.execute(
                text("SELECT state, count(*) FROM batches WHERE job_id = :j GROUP BY state"),
                {"j": job.id},
            ).all()
        )
        reasons = connection.execute(
            text("SELECT DISTINCT reason FROM failed_items WHERE job_id = :j"), {"j": job.id}
        ).scalars()
        assert all("worker process died" in reason for reason in reasons)
    database.dispose()
    assert states == {"done": 19, "failed": 1}, states

    # The worker serves the next job.
    after = producer.submit(job_texts(short_texts, 7)[:200])
    assert wait_terminal(after, 120)["state"] == "succeeded", tail(worker)
    assert worker.process.poll() is None


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_pool_process_killed_mid_batch_loses_and_duplicates_nothing(
    start_worker: Callable[..., Worker],
    short_texts: list[str],
    database_url: str,
    report: Callable[..., Outcome],
) -> None:
    from tasks import producer

    worker = start_worker("child-kill")
    texts = job_texts(short_texts, 4)
    started = time.monotonic()
    job = producer.submit(texts)
    wait_done(job, 200, worker)
    index, claimant = wait_claimed(database_url, job, worker)
    child = int(claimant.rsplit(":", 1)[1])
    assert child in children(worker.process.pid), (claimant, children(worker.process.pid))
    os.kill(child, signal.SIGKILL)
    killed_at = job.status()["done"]

    status = wait_terminal(job, 180)
    note = f"pool process {child} killed on batch {index} at {killed_at} items stored"
    outcome = report(job.id, len(texts), time.monotonic() - started, note=note)
    assert outcome.verdict == ("succeeded", JOB_SIZE, 0, 0), (status, tail(worker))
    row = ledger_row(database_url, job.id, index)
    assert row["state"] == "done" and row["attempts"] >= 2, row  # run again, once stored
    assert worker.process.poll() is None and child not in children(worker.process.pid)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_killed_mid_job_and_replaced_loses_and_duplicates_nothing(
    start_worker: Callable[..., Worker],
    short_texts: list[str],
    database_url: str,
    report: Callable[..., Outcome],
) -> None:
    from tasks import producer

    first = start_worker("doomed")
    texts = job_texts(short_texts, 5)
    started = time.monotonic()
    job = producer.submit(texts)
    wait_done(job, 200, first)
    index, _ = wait_claimed(database_url, job, first)
    os.killpg(first.process.pid, signal.SIGKILL)  # the main process and its pool
    first.stop()
    killed_at = job.status()
    assert not finished(killed_at), "the job finished before the kill"

    second = start_worker("rescuer")
    status = wait_terminal(job, 180)
    note = f"worker killed on batch {index} at {killed_at['done']} items stored"
    outcome = report(job.id, len(texts), time.monotonic() - started, note=note)
    assert outcome.verdict == ("succeeded", JOB_SIZE, 0, 0), (
        status,
        tail(first, second),
    )
    row = ledger_row(database_url, job.id, index)
    assert row["state"] == "done" and row["attempts"] >= 2, row
    ids, vectors = job.embeddings()
    assert ids == [str(i) for i in range(JOB_SIZE)]  # every item exactly once, in order
    assert vectors.shape == (JOB_SIZE, 384)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_sigterm_mid_batch_finishes_the_batch_and_a_successor_finishes_the_job(
    start_worker: Callable[..., Worker],
    short_texts: list[str],
    database_url: str,
    report: Callable[..., Outcome],
) -> None:
    from tasks import producer

    first = start_worker("terminated")
    texts = job_texts(short_texts, 6)
    started = time.monotonic()
    job = producer.submit(texts)
    wait_done(job, 200, first)
    running = wait_claimed(database_url, job, first)  # claimed, not yet stored: running
    os.kill(first.process.pid, signal.SIGTERM)  # the main process only, as a supervisor does
    at_term = job.status()["done"]
    assert first.process.wait(60) == 0, tail(first)
    left = job.status()
    row = ledger_row(database_url, job.id, running[0])
    assert (row["state"], row["worker"]) == ("done", running[1]), (row, running, tail(first))
    assert left["done"] < len(texts), ("the job finished before the successor started", left)
    assert "Warm shutdown" in "".join(first.lines), tail(first)

    second = start_worker("successor")
    status = wait_terminal(job, 180)
    note = f"SIGTERM while batch {running[0]} ran, {at_term} items stored, {left['done']} at exit"
    outcome = report(job.id, len(texts), time.monotonic() - started, note=note)
    assert outcome.verdict == ("succeeded", JOB_SIZE, 0, 0), (
        status,
        tail(first, second),
    )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_worker_killed_with_three_batches_in_flight_loses_and_duplicates_nothing(
    start_worker: Callable[..., Worker],
    short_texts: list[str],
    database_url: str,
    report: Callable[..., Outcome],
) -> None:
    """The feeder's worker (threads pool, ``EMBEDQ_IN_FLIGHT=3``) holds three batches at once,
    claimed together for one engine call; killed then, all three come back and are stored
    once."""
    from tasks import producer

    first = start_worker(
        "overlap",
        processes=3,
        pool="threads",
        EMBEDQ_IN_FLIGHT="3",
        EMBEDQ_COALESCE_TEXTS=str(3 * BATCH_SIZE),
        # The collector waits for all three before it claims: every group is the three batches
        # the threads hold, claimed together and stored only after a second-long engine call.
        EMBEDQ_COALESCE_WAIT_MS="5000",
    )
    texts = job_texts(short_texts, 8)
    started = time.monotonic()
    job = producer.submit(texts)
    wait_done(job, 200, first)

    def three_held() -> list[int] | None:
        found = running_batches(database_url, job.id)
        return found if len(found) == 3 else None

    held = wait_until(
        three_held,
        60,
        "three batches of the job in flight at once",
        every=0.005,
        detail=lambda: f"{job.status()}\n{tail(first)}",
    )
    os.killpg(first.process.pid, signal.SIGKILL)
    first.stop()
    killed_at = job.status()
    assert not finished(killed_at), "the job finished before the kill"
    at_death = running_batches(database_url, job.id)
    assert at_death == held, f"the worker stored {set(held) - set(at_death)} before it died"

    second = start_worker("rescuer-of-three")
    status = wait_terminal(job, 180)
    note = f"worker killed holding batches {held} at {killed_at['done']} items stored"
    outcome = report(job.id, len(texts), time.monotonic() - started, note=note)
    assert outcome.verdict == ("succeeded", JOB_SIZE, 0, 0), (status, tail(first, second))
    for index in held:
        row = ledger_row(database_url, job.id, index)
        assert row["state"] == "done" and row["attempts"] >= 2, row  # run again, stored once
    ids, vectors = job.embeddings()
    assert ids == [str(i) for i in range(JOB_SIZE)]  # every item exactly once, in order
    assert vectors.shape == (JOB_SIZE, 384)
