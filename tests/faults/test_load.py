"""A bounded loopback load test: 3,000 one-text jobs from 4 client threads against one real
worker of two pool processes (so batches of different jobs also race each other inside the
worker) over Redis and PostgreSQL. Every job must reach a terminal state with its vector
stored once; nothing may be lost. The latency figures are printed, not asserted (speed is for
the benchmarks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from sqlalchemy import func, select

from storage.models import Embedding, Job
from storage.session import scope, sessions_for
from tests.conftest import SCENARIO
from tests.processes import Worker

JOBS = 3_000
CLIENTS = 4
POOL = 2
DEADLINE_S = 900  # the whole run; a job waits at most 120 s


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_3000_one_text_jobs_from_4_clients_all_end_and_none_is_lost(
    start_worker: Callable[..., Worker],
    corpus: list[str],
    database_url: str,
    request: pytest.FixtureRequest,
) -> None:
    from tasks import producer

    worker = start_worker("load", processes=POOL)
    texts = [text for text in corpus if 20 <= len(text) <= 200][:JOBS]
    latencies: list[float] = []
    states: dict[str, str] = {}
    errors: list[str] = []
    lock = threading.Lock()
    started = time.monotonic()

    def client(offset: int) -> None:
        for i in range(offset, JOBS, CLIENTS):
            if time.monotonic() - started > DEADLINE_S:
                with lock:
                    errors.append(f"deadline reached at job {i}")
                return
            t0 = time.perf_counter()
            try:
                job = producer.submit([texts[i]], ids=[f"t{i}"])
                status = job.wait(timeout=120)
            except Exception as exc:  # recorded and asserted below
                with lock:
                    errors.append(f"job {i}: {exc}")
                continue
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000)
                states[job.id] = status["state"]

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started

    with scope(sessions_for(database_url)) as session:
        stored = int(session.scalar(select(func.count()).select_from(Embedding)) or 0)
        distinct = int(session.scalar(select(func.count(func.distinct(Embedding.job_id)))) or 0)
        by_state = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (0.0, 0.0)
    line = (
        f"load: {JOBS} one-text jobs, {CLIENTS} clients, one worker of {POOL} processes:"
        f" {wall:.0f}s,"
        f" {len(latencies) / wall:.1f} jobs/s; submit-to-done p50 {p50:.1f} ms, p99 {p99:.1f} ms;"
        f" states {dict(sorted((str(k), v) for k, v in by_state.items()))}; stored {stored},"
        f" lost {JOBS - stored}"
    )
    print(line)
    request.node.user_properties.append((SCENARIO, line))
    assert errors == [], errors[:5]
    assert set(states.values()) == {"succeeded"} and len(states) == JOBS
    assert (stored, distinct) == (JOBS, JOBS)  # one vector per job, none lost or repeated
    assert worker.process.poll() is None
