"""The product's main path with real parts: producer -> Redis -> a real Celery worker process
(prefork) -> SQLite or PostgreSQL, with the real exported model."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from storage.models import BatchStat
from storage.session import make_engine, scope, session_factory
from tests.acceptance.conftest import Fleet, Worker
from tests.conftest import cosines
from tests.waiting import wait_until
from worker.engine import Engine
from worker.settings import get_settings


@pytest.mark.parametrize("fleet", ["sqlite", "postgresql"], indirect=True)
def test_1000_corpus_texts_round_trip_in_order(
    fleet: Fleet, engine: Engine, corpus: list[str]
) -> None:
    from tasks import producer

    texts = corpus[::38][:1000]
    started = time.monotonic()
    job = producer.submit(texts, ids=[f"doc-{i}" for i in range(1000)])
    status = job.wait(timeout=600)
    elapsed = time.monotonic() - started

    assert status["state"] == "succeeded", (status, fleet.worker.tail(30))
    assert (status["done"], status["failed"]) == (1000, 0)
    ids, vectors = job.embeddings()
    assert ids == [f"doc-{i}" for i in range(1000)]
    expected = np.concatenate([engine.encode(texts[i : i + 500]).vectors for i in (0, 500)])
    assert float(np.min(cosines(vectors, expected))) >= 0.9999

    database = make_engine(fleet.database_url)
    with scope(session_factory(database)) as session:
        stats = session.query(BatchStat).filter(BatchStat.job_id == job.id).all()
    database.dispose()
    assert len(stats) == math.ceil(1000 / get_settings().job_batch_size)
    assert {s.provider for s in stats} == {"CPUExecutionProvider"}
    assert sum(s.texts for s in stats) == 1000 and all(s.total_ms > 0 for s in stats)
    print(f"1000 texts through Redis + worker in {elapsed:.1f}s")


def test_an_unknown_model_fails_its_job_with_a_reason_and_the_worker_goes_on(
    fleet: Fleet,
) -> None:
    from tasks import producer

    bad = producer.submit(["some text", "another"], model="no-such-model")
    status = bad.wait(timeout=120)
    assert status["state"] == "failed" and status["failed"] == 2
    assert "no-such-model" in status["error"] and "embedq models pull" in status["error"]
    assert status["error_kind"] == "model"

    good = producer.submit(["the worker is still up"])
    assert good.wait(timeout=120)["state"] == "succeeded"
    assert fleet.worker.alive()


def test_interactive_work_is_served_ahead_of_a_bulk_backlog(
    fleet: Fleet, corpus: list[str]
) -> None:
    from tasks import producer

    backlog = producer.submit(corpus[5000:6600], queue="bulk", tag="backfill")
    # The worker is busy with the backlog.
    wait_until(lambda: backlog.status()["done"] > 0, 300, "the bulk job to start")
    # Five interactive batches, queued behind about a dozen bulk ones.
    before = backlog.status()["done"]
    urgent = producer.submit(corpus[9000:9320])
    assert urgent.wait(timeout=120)["state"] == "succeeded"
    left = backlog.status()
    assert left["done"] < left["total"], "the backlog finished first"
    # Served back to back: at most the bulk batch in flight (and one racing it) ran meanwhile.
    # Round-robin between the queues would have interleaved about five bulk batches.
    assert left["done"] - before <= 2 * get_settings().job_batch_size
    assert backlog.wait(timeout=600)["state"] == "succeeded"


def test_a_registered_model_is_prepared_on_the_worker_host_when_a_job_needs_it(
    fleet: Fleet, minilm: Path, engine: Engine, corpus: list[str]
) -> None:
    """The worker lacks a copy of minilm under a new name; the catalog says it comes from a
    folder of ONNX files. The first batch asks its host for it, the download task prepares it,
    the batch runs."""
    from storage import model_catalog
    from tasks import producer

    copy = f"minilm-copy-{uuid.uuid4().hex[:8]}"  # new in every run: it must be downloaded
    producer.register_model(str(minilm), copy)
    producer.register_model("/nowhere/such-model", "broken")
    texts = corpus[100:300]
    job = producer.submit(texts, model=copy)
    broken = producer.submit(["a text for a model that cannot be prepared"], model="broken")

    status = job.wait(timeout=300)
    assert (status["state"], status["done"]) == ("succeeded", 200), fleet.worker.tail(30)
    _, vectors = job.embeddings()
    assert float(np.min(cosines(vectors, engine.encode(texts).vectors))) >= 0.9999

    failed = broken.wait(timeout=120)
    assert failed["state"] == "failed"
    assert "could not be prepared" in failed["error"] and "/nowhere/such-model" in failed["error"]
    with scope(session_factory(database := make_engine(fleet.database_url))) as session:
        states = {(row.name, str(row.state)) for row in model_catalog.list_prepared(session)}
    database.dispose()
    assert {("minilm", "ready"), (copy, "ready"), ("broken", "failed")} <= states
    # The download task ran for each model, each time to its end (one ran per model and per
    # ending; a retried or repeated download would name the model twice).
    log = "".join(fleet.worker.lines)
    ended = re.findall(
        r"Task embedq\.download\[[0-9a-f-]+\] succeeded in [^:]*: \{'model': '([^']+)'", log
    )
    assert sorted(ended) == sorted([copy, "broken"]), log
    assert fleet.worker.alive()


def embedq_worker(*options: str) -> list[str]:
    return [sys.executable, "-m", "tasks.cli", "worker", "-n", "gpu@%h", *options]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_gpu_worker_binds_one_process_to_each_device(
    pipeline_env: dict[str, str],
) -> None:
    """``embedq worker`` with two devices: two pool processes, each warmed on its own device.
    There is no GPU here, so the sessions fall back to the CPU (allowed by the warn policy);
    what is checked is the binding and the warm start, which are the same on a GPU host."""
    from tasks import producer

    env = {**pipeline_env, "EMBEDQ_GPU_DEVICES": "0,1", "EMBEDQ_PROVIDER_FALLBACK": "warn"}
    gpu = Worker(env, "gpu", embedq_worker())
    try:
        assert producer.submit(["bound and warm"]).wait(timeout=120)["state"] == "succeeded"
        wanted = [f"pool process {i} bound to GPU {i}" for i in (0, 1)]
        wanted += [f"model=minilm provider=CPUExecutionProvider device={i}" for i in (0, 1)]
        wait_until(
            lambda: all(gpu.logged(words) for words in wanted),
            60,
            "both pool processes bound and warm",
            detail=gpu.tail,
        )
        log = "".join(gpu.lines)
        assert "pool  prefork x 2" in log and "gpu devices  0,1" in log
    finally:
        gpu.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_gpu_worker_refuses_to_start_on_the_cpu(pipeline_env: dict[str, str]) -> None:
    if Path("/dev/nvidia0").exists():
        pytest.skip("this host has a GPU: nothing falls back")
    env = {**os.environ, **pipeline_env, "EMBEDQ_GPU_DEVICES": "0"}
    for unset in ("EMBEDQ_PROVIDER_FALLBACK", "EMBEDQ_PROVIDERS"):  # defaults: CUDA, error
        env.pop(unset, None)
    process = subprocess.Popen(
        embedq_worker(), env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # it started a worker after all
        process.communicate()
        pytest.fail("the GPU worker started on the CPU")
    assert process.returncode == 3, stderr[-2000:]
    assert "refusing to run on CPUExecutionProvider" in stderr
    assert "GPU 0 cannot run minilm" in stderr
