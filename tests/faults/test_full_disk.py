"""The disk under the SQLite store fills up mid-job, then space comes back: each batch whose
write the store refused keeps its vectors and is written again (``tasks.writing``), never sent
back to the queue to run its model again (the worker's ``/metrics`` counts the texts its model
ran); the job ends with nothing lost.

The disk is real: a tmpfs of this test's own (mounting needs root, which CI has), filled with a
file until the kernel answers ENOSPC, and emptied again by deleting that file.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.databases import Databases
from tests.faults.outcomes import JOB_SIZE, Outcome, job_texts, tail, wait_done, wait_terminal
from tests.processes import Worker, free_port
from tests.prometheus import scrape, total
from tests.waiting import wait_until

DISK_MIB = 64
WRITE_TRIES_HELD = 3
"""Failed writes the worker logs before space comes back: several tries, seconds apart."""


class SmallDisk:
    """A tmpfs mounted at ``folder``, which ``fill`` fills and ``free`` empties again."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m,mode=0777", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        require(mounted.returncode == 0, f"cannot mount a tmpfs: {mounted.stderr.strip()}")
        self.filler = folder / "filler"

    def fill(self) -> int:
        """Write the filler until the disk is full; the bytes written."""
        written = 0
        with self.filler.open("wb", buffering=0) as out:
            for chunk in (1024 * 1024, 4096, 512):
                block = b"\0" * chunk
                while True:
                    try:
                        written += out.write(block) or 0
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.folder)], check=False)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    small = SmallDisk(tmp_path / "disk")
    yield small
    small.unmount()


@pytest.fixture
def database_url(disk: SmallDisk, databases: Databases) -> str:
    """The fault fixtures' store: a migrated SQLite file on the small disk."""
    return databases.sqlite(disk.folder)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_full_disk_mid_job_keeps_the_vectors_and_writes_them_when_space_comes_back(
    pool: str,
    disk: SmallDisk,
    start_worker: Callable[..., Worker],
    short_texts: list[str],
    report: Callable[..., Outcome],
) -> None:
    from tasks import producer

    # Each try in place waits up to 4 s (the fast timings' backoff cap); the batch's time limit
    # is far enough that the tries in place are not cut short by it.
    threads = {"EMBEDQ_IN_FLIGHT": "4"} if pool == "threads" else {}
    port = free_port()
    worker = start_worker(
        f"full-disk-{pool}",
        processes=4 if pool == "threads" else 1,
        pool=pool,
        EMBEDQ_TASK_TIME_LIMIT="120",
        EMBEDQ_METRICS_PORT=str(port),
        **threads,
    )
    texts = job_texts(short_texts, 2 if pool == "prefork" else 3)
    started = time.monotonic()
    job = producer.submit(texts)
    wait_done(job, 200, worker)

    since = len(worker.lines)
    filled = disk.fill()
    try:
        wait_until(
            lambda: (
                sum("vectors kept" in line for line in worker.lines[since:]) >= WRITE_TRIES_HELD
            ),
            120,
            f"{WRITE_TRIES_HELD} refused writes on the full disk",
            detail=lambda: tail(worker),
        )
        at = job.status()["done"]
    finally:
        disk.free()

    status = wait_terminal(job, 240)
    note = f"{pool}: disk full ({filled // 1024} KiB filler) from {at} items stored"
    outcome = report(job.id, len(texts), time.monotonic() - started, note=note)
    assert outcome.verdict == ("succeeded", JOB_SIZE, 0, 0), (status, tail(worker))
    assert worker.process.poll() is None
    # Each text ran through the model once: what a refused write made was written again.
    # (A batch whose claim the full disk refused went back to the queue before its model ran.)
    metrics = scrape(port)
    assert total(metrics, "embedq_write_retries_total") >= WRITE_TRIES_HELD
    assert total(metrics, "embedq_encoded_texts_total") == JOB_SIZE, tail(worker)
