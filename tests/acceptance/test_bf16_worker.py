"""A job on a bf16 model through a real worker: the vectors are the model's, and batch_stats
records the runtime and the precision that really ran (bf16 where the CPU has it; elsewhere the
worker says why and runs fp32, or, under the error policy, fails the job with that reason)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from storage.models import BatchStat
from storage.session import make_engine, scope, session_factory
from tests.acceptance.conftest import Fleet, Worker
from tests.conftest import BF16_MODEL_NAME, cosines
from worker import hardware
from worker.engine import Engine

HAS_BF16 = hardware.bf16_missing() is None


def stats_of(database_url: str, job_id: str) -> list[BatchStat]:
    database = make_engine(database_url)
    with scope(session_factory(database)) as session:
        rows = session.query(BatchStat).filter(BatchStat.job_id == job_id).all()
        session.expunge_all()
    database.dispose()
    return rows


def test_a_job_on_a_bf16_model_records_what_really_ran(
    fleet: Fleet, bf16_model: Path, engine: Engine, corpus: list[str]
) -> None:
    from tasks import producer

    texts = corpus[::97][:300]
    job = producer.submit(texts, model=BF16_MODEL_NAME)
    status = job.wait(timeout=300)
    assert status["state"] == "succeeded", (status, fleet.worker.tail(30))
    _, vectors = job.embeddings()
    expected = np.concatenate([engine.encode(texts[i : i + 150]).vectors for i in (0, 150)])
    assert float(np.min(cosines(vectors, expected))) >= 0.9999
    rows = stats_of(fleet.database_url, job.id)
    assert {r.provider for r in rows} == {"OpenVINO:CPU"}
    assert {r.precision for r in rows} == ({"bf16"} if HAS_BF16 else {"fp32"})
    if not HAS_BF16:
        log = "".join(fleet.worker.lines)
        assert "avx512_bf16" in log and "running on fp32 instead" in log


@pytest.mark.skipif(HAS_BF16, reason="this CPU computes bf16: there is no fallback to refuse")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_under_the_error_policy_the_job_fails_with_the_reason_and_the_worker_goes_on(
    pipeline_env: dict[str, str], bf16_model: Path
) -> None:
    from tasks import producer

    env = {**pipeline_env, "EMBEDQ_PROVIDER_FALLBACK": "error"}
    worker = Worker(env, "bf16-strict")
    try:
        bad = producer.submit(["a text for a bf16 model"], model=BF16_MODEL_NAME)
        status = bad.wait(timeout=120)
        assert status["state"] == "failed", (status, worker.tail(30))
        assert "avx512_bf16" in status["error"] and "EMBEDQ_PROVIDER_FALLBACK" in status["error"]
        good = producer.submit(["the fp32 model still runs"])
        assert good.wait(timeout=120)["state"] == "succeeded"
        assert worker.alive()
    finally:
        worker.stop()
