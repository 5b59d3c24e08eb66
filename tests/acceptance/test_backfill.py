"""A 20,000-text backfill (short texts: the model's work is not the point) through real Redis, a
two-process worker and PostgreSQL: the CLI is killed about half way and resumed, then the worker
is killed and replaced; every item ends stored once, little is computed twice, and the bulk
queue never holds more than the in-flight bound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from storage.models import Backfill, BatchStat, Embedding, Job
from storage.session import scope, sessions_for
from tests.processes import Worker, celery_worker
from tests.waiting import wait_until

BOUND = 4  # batches in flight
SMALL, LARGE = 10_000, 100_000
"""The memory test's sources: one ten times the other."""


def two_process_worker(env: dict[str, str], name: str) -> Worker:
    return Worker(env, name, celery_worker(name, queues="bulk", processes=2))


def start_cli(env: dict[str, str], source: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tasks.cli", "backfill", "big", "--source", str(source)]
    command += ["--max-in-flight", str(BOUND), "--json"]
    return subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def done_items(url: str) -> int:
    with scope(sessions_for(url)) as session:
        found = session.get(Backfill, "big")
        job = None if found is None else session.get(Job, found.job_id)
        return 0 if job is None else job.done_items


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_backfill_survives_a_killed_cli_and_a_killed_worker(
    pipeline_env: dict[str, str], short_texts: list[str], tmp_path: Path, database_url: str
) -> None:
    texts = [f"{short_texts[i % len(short_texts)]} ({i})" for i in range(20000)]  # all distinct
    source = tmp_path / "big.jsonl"
    with source.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"c{i}", "text": text}) + "\n")
    env = {
        **pipeline_env,
        "EMBEDQ_PROCESSES": "2",
        # Batches of short texts take well under a second: the hard limit is a backstop, and a
        # dead worker's batches come back after the visibility timeout, in seconds.
        "EMBEDQ_TASK_TIME_LIMIT": "8",
        "EMBEDQ_VISIBILITY_TIMEOUT": "10",
        "EMBEDQ_UNACKED_RESTORE_INTERVAL": "1",
        # A message the killed worker had taken but not yet claimed is the reconciler's to
        # send again: it looks every 2 s for batches idle for 20 s.
        "EMBEDQ_STUCK_AFTER": "20",
        "EMBEDQ_SWEEP_INTERVAL": "2",
    }
    peak = {"bulk": 0}
    stop = threading.Event()

    def sample() -> None:
        client = redis.Redis.from_url(env["EMBEDQ_BROKER_URL"])
        while not stop.is_set():
            peak["bulk"] = max(peak["bulk"], int(client.llen("bulk")))
            time.sleep(0.01)
        client.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first = two_process_worker(env, "bulk-1")
    workers = [first]
    try:
        cli = start_cli(env, source)
        wait_until(lambda: done_items(database_url) >= 9000, 600, "about half the backfill")
        os.killpg(cli.pid, signal.SIGKILL)  # the CLI dies; its batches in flight go on
        cli.communicate()
        killed_at = done_items(database_url)
        assert killed_at < len(texts)

        resumed = start_cli(env, source)
        wait_until(lambda: done_items(database_url) >= 14000, 600, "most of the backfill")
        os.killpg(first.process.pid, signal.SIGKILL)  # the worker dies mid-batch
        first.stop()
        workers.append(two_process_worker(env, "bulk-2"))
        out, _ = resumed.communicate(timeout=900)
    finally:
        stop.set()
        for running in workers:
            running.stop()
    assert resumed.returncode == 0, out[-3000:]
    outcome = json.loads(out)
    assert (outcome["state"], outcome["items"], outcome["done"], outcome["failed"]) == (
        "succeeded",
        20000,
        20000,
        0,
    )
    assert outcome["runs"] == 2 and outcome["reused"] == 0
    with scope(sessions_for(database_url)) as session:
        job_id = outcome["job_id"]
        stored = session.scalar(select(func.count()).where(Embedding.job_id == job_id))
        distinct = session.scalar(
            select(func.count(func.distinct(Embedding.item_id))).where(Embedding.job_id == job_id)
        )
        computed = session.scalar(
            select(func.sum(BatchStat.texts)).where(BatchStat.job_id == job_id)
        )
    assert stored == distinct == 20000
    # Only batches in flight at a kill may have run twice: the resumed run sent nothing stored.
    assert computed is not None and 20000 <= computed <= 20000 + 2 * BOUND * 128
    assert peak["bulk"] <= BOUND, f"the bulk queue held {peak['bulk']} messages"
    print(f"computed {computed} texts for 20000 items; bulk queue peak {peak['bulk']}")


def peak_rss_kb(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``command`` in a fresh interpreter that reports its child's peak RSS."""
    probe = (
        "import resource, subprocess, sys; "
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(done.stderr[-2000:]); print(done.stdout); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(done.returncode)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *command],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    return int(lines[-1]), "\n".join(lines[:-1])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_backfill_process_memory_does_not_grow_with_the_source(
    pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    """10 thousand and 100 thousand short rows (64 distinct texts, so after the first batches
    the content cache serves them and the test stays short): the producer streams, so its peak
    RSS is about the same."""
    worker = two_process_worker(pipeline_env, "bulk-mem")
    try:
        peaks = {}
        for rows in (SMALL, LARGE):
            source = tmp_path / f"rows-{rows}.jsonl"
            with source.open("w", encoding="utf-8") as handle:
                for i in range(rows):
                    text = f"synthetic row {i % 64}: a short text about item {i % 64}"
                    handle.write(json.dumps({"id": f"r{i}", "text": text}) + "\n")
            command = [sys.executable, "-m", "tasks.cli", "backfill", f"mem-{rows}"]
            command += ["--source", str(source), "--json", "--max-in-flight", str(BOUND)]
            peaks[rows], out = peak_rss_kb(command, pipeline_env)
            outcome = json.loads(out)
            assert (outcome["state"], outcome["done"]) == ("succeeded", rows)
            assert outcome["reused"] >= rows - 64 * 40  # almost all from the content cache
    finally:
        worker.stop()
    print(f"peak RSS: {peaks[SMALL]} KiB for {SMALL} rows, {peaks[LARGE]} KiB for {LARGE} rows")
    assert peaks[LARGE] <= 1.5 * peaks[SMALL], peaks
