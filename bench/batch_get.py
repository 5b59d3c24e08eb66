"""``GET /v1/batches/{id}`` on a running 200,000-line OpenAI batch, through a live ``embedq serve``.

On a new PostgreSQL database it writes one running batch of ``--lines`` one-text requests and
its job with every text stored (``bench/batch_polls.py``'s rows: ``generate_series``, no
ANALYZE), holds the batch's lease as another serve instance would, starts ``embedq serve`` on
that store and times ``--polls`` polls of the batch from an HTTP client, then the count its
runner keeps on the row (``storage.openai_batches.keep_counts``) a few times. Then it ends the
batch as its runner does (the output file's size written through once, what each metadata
request cost before) and times ``GET /v1/files/{output id}``. Prints median, p99 and max
milliseconds.

    python bench/batch_get.py [--lines 200000] [--polls 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from bench.batch_polls import BATCH, JOB, filled  # noqa: E402
from bench.hostile import start_serve  # noqa: E402
from bench.pipeline import stop_worker  # noqa: E402
from storage import leases, openai_batches  # noqa: E402
from storage.models import Backfill, OpenAIBatch, OpenAIBatchStatus  # noqa: E402
from storage.session import scope  # noqa: E402
from tasks.api.auth import key_id  # noqa: E402
from tasks.openai_batch import output  # noqa: E402
from tasks.openai_batch.shapes import OutputFile  # noqa: E402
from worker import hardware  # noqa: E402

URL = "postgresql+psycopg://postgres@127.0.0.1:5432/embedq_bench_batch_get"
KEY = "sk-hostile-a"  # bench/hostile.py's first key, which its start_serve configures


def summary(name: str, values: list[float]) -> str:
    p99 = float(np.percentile(values, 99))
    return (
        f"  {name:22} {len(values):3}: median {statistics.median(values):7.1f} ms,"
        f" p99 {p99:7.1f} ms, max {max(values):7.1f} ms"
    )


@dataclass(frozen=True)
class Output:
    id: str
    size: int


def end(sessions: sessionmaker[Session]) -> Output:
    """End the batch ``completed`` as its runner does: its files' sizes written through once."""
    with scope(sessions) as session:
        batch = openai_batches.get_batch(session, BATCH)
    assert batch is not None
    sizes = output.file_sizes(sessions, batch, OpenAIBatchStatus.COMPLETED)
    out = OutputFile(BATCH, errors=False)
    with scope(sessions) as session:
        openai_batches.move_batch(
            session,
            BATCH,
            OpenAIBatchStatus.COMPLETED,
            only_from=[OpenAIBatchStatus.IN_PROGRESS],
            output_file_id=out.id,
            output_bytes=sizes[0],
            error_bytes=sizes[1],
            completed_at=datetime.now(UTC),
        )
    return Output(out.id, sizes[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--polls", type=int, default=100)
    parser.add_argument("--counts", type=int, default=5)
    args = parser.parse_args()
    engine, sessions = filled(args.lines, URL)
    with scope(sessions) as session:  # owned by the key polling it, run by another instance
        session.execute(
            update(OpenAIBatch).where(OpenAIBatch.id == BATCH).values(owner=key_id(KEY))
        )
        assert leases.take_lease(session, f"openai:{BATCH}", "another-instance", 3600)
        session.add(Backfill(name=BATCH, job_id=JOB, model_name="m", source="bench"))
    counted: list[float] = []
    for _ in range(args.counts):
        started = time.perf_counter()
        with scope(sessions) as session:
            total, completed, _failed = openai_batches.keep_counts(session, BATCH, JOB)
        counted.append((time.perf_counter() - started) * 1000)
    assert (total, completed) == (args.lines, args.lines), (total, completed)

    env = {"EMBEDQ_DATABASE_URL": URL, "EMBEDQ_BROKER_URL": "redis://127.0.0.1:6379/10"}
    process, url = start_serve(HERE, {**env, "EMBEDQ_DEFAULT_MODEL": "minilm"}, 10)
    polls: list[float] = []
    described: list[float] = []
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as client:
            for _ in range(args.polls):
                started = time.perf_counter()
                answer = client.get(f"{url}/v1/batches/{BATCH}")
                polls.append((time.perf_counter() - started) * 1000)
                answer.raise_for_status()
                assert answer.json()["request_counts"]["completed"] == args.lines
            started = time.perf_counter()
            out = end(sessions)
            written_s = time.perf_counter() - started
            for _ in range(args.polls):
                started = time.perf_counter()
                answer = client.get(f"{url}/v1/files/{out.id}")
                described.append((time.perf_counter() - started) * 1000)
                assert answer.json()["bytes"] == out.size, answer.text
    finally:
        stop_worker(process)
        engine.dispose()
    print(f"bench/batch_get.py on {hardware.cpu_model()}, {os.cpu_count()} CPUs, PostgreSQL:")
    print(f"a running batch of {args.lines:,} lines, every text stored, no ANALYZE")
    print(summary("GET /v1/batches/{id}", polls))
    print(summary("runner's count (row)", counted))
    print(summary("GET /v1/files/{output}", described))
    print(f"  the output file ({out.size / 1e6:.1f} MB) written through once: {written_s:.1f} s")


if __name__ == "__main__":
    main()
