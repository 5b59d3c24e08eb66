"""``embedq health`` against real workers over Redis: it lists what answers, and exits non-zero
when a queue holds messages no running worker consumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.processes import Worker


def health(env: dict[str, str]) -> tuple[int, dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "health", "--json", "--timeout", "3"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_health_names_the_queue_nobody_serves(pipeline_env: dict[str, str]) -> None:
    from tasks import producer

    worker = Worker(pipeline_env, "embedq-health")
    try:
        job = producer.submit(["a text to warm the worker"])
        assert job.wait(timeout=120)["state"] == "succeeded"
        code, result = health(pipeline_env)
        assert code == 0, result
        (node,) = result["workers"]  # type: ignore[misc]
        assert {"interactive", "bulk"} <= set(node["queues"]) and "minilm" in node["models"]
        assert node["last_provider"] == "CPUExecutionProvider" and not node["fell_back_from_gpu"]
        assert 0 < node["engine_busy_ratio"] <= 1  # it embedded a text in the last minute
    finally:
        worker.stop()  # no worker left; a bulk job waits
    producer.submit(["nobody will take this"], queue="bulk")
    code, result = health(pipeline_env)
    assert code == 1
    assert result["workers"] == [] and result["unserved"] == ["bulk"]
    assert result["queues"]["bulk"] == 1  # type: ignore[index]
