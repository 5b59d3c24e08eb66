"""Prometheus metrics from a real two-process worker: what both pool processes did is summed on
the parent's /metrics, with queue depths read from the broker."""

from __future__ import annotations

import sys

import pytest

from tests.processes import Worker, free_port
from tests.prometheus import scrape, total
from tests.waiting import wait_until

REPUBLISHED = 'embedq_reconciled_batches_total{action="republished"}'


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_worker_metrics_sum_the_pool_processes(
    pipeline_env: dict[str, str], corpus: list[str]
) -> None:
    from tasks import producer

    port = free_port()
    env = {**pipeline_env, "EMBEDQ_METRICS_PORT": str(port), "EMBEDQ_PROCESSES": "2"}
    env |= {"EMBEDQ_STUCK_AFTER": "1", "EMBEDQ_SWEEP_INTERVAL": "0.5"}
    command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "2"]
    command += ["-n", "metrics@%h", "--without-gossip", "--without-mingle", "-l", "INFO"]
    worker = Worker(env, "metrics", command)
    try:
        jobs = [producer.submit(corpus[i * 200 : i * 200 + 200]) for i in range(3)]
        assert all(job.wait(timeout=300)["state"] == "succeeded" for job in jobs)
        assert producer.submit(["x"], model="not-there").wait(timeout=60)["state"] == "failed"
        orphan = recorded_but_never_published(corpus[700:710])
        assert orphan.wait(timeout=60)["state"] == "succeeded"  # the reconciler sent it
        # The parent counts a re-publish when its sweep ends, a moment after the batch ran.
        values = wait_until(
            lambda: (found := scrape(port)).get(REPUBLISHED) and found,
            30,
            "the reconciler's re-publish in /metrics",
        )
    finally:
        worker.stop()
    assert total(values, "embedq_texts_total{") == 610
    batches = total(values, "embedq_batches_total{")
    assert batches == 7  # 3 jobs x 2 batches of at most 128, and the orphan's one
    assert values['embedq_batch_seconds_count{model="minilm",stage="inference"}'] == batches
    assert total(values, 'embedq_errors_total{kind="model"') == 1
    engines = [k for k in values if k.startswith("embedq_engine_info{")]
    assert len(engines) == 2 and all('provider="CPUExecutionProvider"' in k for k in engines)
    assert 'embedq_queue_messages{queue="interactive"}' in values
    pids = {k.split('pid="')[1].split('"')[0] for k in engines}
    assert len(pids) == 2  # both pool processes reported
    assert values[REPUBLISHED] == 1
    busy = {k: v for k, v in values.items() if k.startswith("embedq_engine_busy_ratio{")}
    assert {k.split('pid="')[1].split('"')[0] for k in busy} == pids  # each ran batches
    assert all(0 < ratio <= 1 for ratio in busy.values())


def recorded_but_never_published(texts: list[str]) -> object:
    """A job as a producer killed between its commit and its publish leaves it: in the store
    with its batch, no message anywhere."""
    import uuid

    from storage import jobs, ledger
    from storage.models import Job
    from storage.session import scope, sessions_for
    from tasks import producer
    from worker.settings import get_settings

    settings = get_settings()
    job_id = str(uuid.uuid4())
    ids = [str(i) for i in range(len(texts))]
    with scope(sessions_for(settings.database_url)) as session:
        job = Job(id=job_id, model_name="minilm", queue="interactive", total_items=len(texts))
        jobs.create_job(session, job)
        ledger.add_batches(session, job_id, producer.plan_batches(texts, ids, 128))
    return producer.JobHandle(job_id, settings)
