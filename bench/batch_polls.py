"""Polling a running 200,000-line OpenAI batch: ``GET /v1/batches/{id}`` reads its request
counts from the store each time (``storage.openai_batches.request_counts``).

On a new PostgreSQL database it writes one batch of ``--lines`` one-text requests and its job
with every text stored (rows made by ``generate_series``, statistics as a fresh table has them:
no ANALYZE), then times ``--polls`` reads of the counts two ways in turn: the query before
(the stored texts counted per line, joined to the requests) and ``request_counts`` now (one
grouped pass over both, no join). Prints medians and p99 (a query that passes
``--before-timeout-s`` is stopped and counted as that long).

    python bench/batch_polls.py [--lines 200000] [--polls 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, and_, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ceiling import fresh_postgresql
from storage import openai_batches, schema
from storage.models import Embedding, Job, OpenAIBatch, OpenAIBatchRequest, OpenAIFile
from storage.session import make_engine, scope, session_factory
from worker import hardware

URL = "postgresql+psycopg://postgres@127.0.0.1:5432/embedq_bench_polls"
BATCH, JOB = "batch_bench", "job-bench"


def fill(session: Session, lines: int) -> None:
    now = datetime.now(UTC)
    session.add(
        OpenAIFile(id="file-bench", owner="k", filename="in.jsonl", purpose="batch", bytes=1)
    )
    session.flush()  # no relationship orders the two inserts
    session.add(
        OpenAIBatch(
            id=BATCH,
            owner="k",
            input_file_id="file-bench",
            endpoint="/v1/embeddings",
            completion_window="24h",
            status="in_progress",
            expires_at=now + timedelta(days=1),
        )
    )
    session.add(Job(id=JOB, model_name="m", queue="bulk", total_items=lines, meta={}))
    session.flush()
    session.execute(
        text(
            "INSERT INTO api_batch_requests (batch_id, line, custom_id, inputs, base64)"
            " SELECT :b, n, 'r' || n, 1, false FROM generate_series(1, :lines) AS n"
        ),
        {"b": BATCH, "lines": lines},
    )
    session.execute(
        text(
            "INSERT INTO embeddings (job_id, item_id, position, text_sha256, dim, vector,"
            " token_count, truncated)"
            " SELECT :j, lpad(n::text, 8, '0') || '.0', n, md5(n::text), 4, :v, 3, false"
            " FROM generate_series(1, :lines) AS n"
        ),
        {"j": JOB, "lines": lines, "v": np.zeros(4, "<f4").tobytes()},
    )


def filled(lines: int, url: str = URL) -> tuple[Engine, sessionmaker[Session]]:
    """A new PostgreSQL database at ``url`` holding the batch and its job (``fill``)."""
    fresh_postgresql(url)
    schema.upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with scope(sessions) as session:
        fill(session, lines)
    return engine, sessions


def before(session: Session) -> int:
    """The query before: stored texts counted per line, joined to the requests."""
    line = openai_batches._line_of(Embedding.item_id)
    per_line = (
        select(line.label("line"), func.count().label("stored"))
        .where(Embedding.job_id == JOB)
        .group_by("line")
        .subquery()
    )
    query = (
        select(func.count())
        .select_from(OpenAIBatchRequest)
        .join(
            per_line,
            and_(
                per_line.c.line == OpenAIBatchRequest.line,
                per_line.c.stored == OpenAIBatchRequest.inputs,
            ),
        )
        .where(OpenAIBatchRequest.batch_id == BATCH, OpenAIBatchRequest.error_code.is_(None))
    )
    return int(session.scalar(query) or 0)


def after(session: Session) -> int:
    return openai_batches.request_counts(session, BATCH, JOB)[1]


def timed(session: Session, call: Any) -> tuple[float, int]:
    started = time.perf_counter()
    value = call(session)
    return (time.perf_counter() - started) * 1000, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--polls", type=int, default=100)
    parser.add_argument("--before-timeout-s", type=float, default=20.0)
    args = parser.parse_args()
    engine, sessions = filled(args.lines)
    times: dict[str, list[float]] = {"before": [], "after": []}
    limit_ms = args.before_timeout_s * 1000
    for _ in range(args.polls):
        for name, call in (("before", before), ("after", after)):
            if times[name] and min(times[name]) >= limit_ms:
                continue  # it hits the limit every time: once is enough
            try:
                with scope(sessions) as session:
                    # Over the limit a poll is stopped and counted as the limit (a floor).
                    session.execute(text(f"SET LOCAL statement_timeout = {int(limit_ms)}"))
                    ms, value = timed(session, call)
                assert value == args.lines, (name, value)
            except OperationalError:  # the statement timeout
                ms = limit_ms
            times[name].append(ms)
    engine.dispose()
    print(f"bench/batch_polls.py on {hardware.cpu_model()}: {args.lines:,} lines, PostgreSQL,")
    print("statistics of freshly filled tables (no ANALYZE)")
    for name, values in times.items():
        p99 = float(np.percentile(values, 99))
        print(
            f"  {name:7} {len(values):3} polls: median {statistics.median(values):9.1f} ms,"
            f" p99 {p99:9.1f} ms, max {max(values):9.1f} ms"
        )
    ratio = statistics.median(times["before"]) / statistics.median(times["after"])
    print(f"  before / after (medians): {ratio:.1f}x")


if __name__ == "__main__":
    main()
