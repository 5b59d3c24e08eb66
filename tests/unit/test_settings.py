"""The settings object: read from the environment (the one place tests set it), checked, and
the values derived from it. (That the Celery app and the download task read it when used, not
at import: tests/integration/test_light_imports.py.)"""

import os
from pathlib import Path

import pytest

from worker.settings import Settings


def test_environment_configures_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBEDQ_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("EMBEDQ_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    monkeypatch.setenv("EMBEDQ_PROVIDER_FALLBACK", "error")
    settings = Settings()
    assert settings.model_dir == tmp_path
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.provider_fallback == "error"


def test_threads_default_to_this_process_share_of_the_cores() -> None:
    cores = os.cpu_count() or 1
    assert Settings(processes=1).threads() == cores
    assert Settings(processes=cores * 2).threads() == 1
    assert Settings(intra_op_threads=3, processes=8).threads() == 3


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDQ_PROVIDER_FALLBACK", "ignore")
    with pytest.raises(ValueError, match="provider_fallback"):
        Settings()


def test_a_gpu_worker_runs_one_process_per_device_and_refuses_a_cpu_fallback() -> None:
    gpu = Settings(gpu_devices="2,3", processes=5)  # type: ignore[arg-type]
    assert gpu.gpu_devices == [2, 3]
    assert (gpu.worker_processes(), gpu.threads(), gpu.fallback_policy()) == (2, 1, "error")
    assert Settings(gpu_devices=[0], provider_fallback="warn").fallback_policy() == "warn"
    cpu = Settings(processes=2)
    assert (cpu.worker_processes(), cpu.fallback_policy()) == (2, "warn")


def test_the_visibility_timeout_outlasts_the_longest_task() -> None:
    assert Settings(task_time_limit=100, download_time_limit=900).visibility() == 1860
    assert Settings(task_time_limit=1000, download_time_limit=900).visibility() == 2060


def test_json_logs_carry_the_batch_fields() -> None:
    import json
    import logging

    from worker.logs import JsonFormatter

    record = logging.makeLogRecord(
        {"msg": "batch done: %s", "args": ("j1",), "levelname": "INFO", "name": "tasks.embed"}
    )
    record.job, record.texts, record.provider = "j1", 128, "CPUExecutionProvider"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "batch done: j1" and line["level"] == "INFO"
    assert (line["job"], line["texts"], line["provider"]) == ("j1", 128, "CPUExecutionProvider")


def test_a_worker_with_one_gpu_feeds_it_from_threads_and_others_run_prefork() -> None:
    from worker.app import config

    one_gpu, two_gpus, cpu = (
        Settings(gpu_devices=[0]),
        Settings(gpu_devices=[0, 1]),
        Settings(),
    )
    assert [s.batches_in_flight() for s in (one_gpu, two_gpus, cpu)] == [16, 1, 1]
    assert Settings(in_flight=4).batches_in_flight() == 4
    assert (config(one_gpu)["worker_pool"], config(one_gpu)["worker_concurrency"]) == (
        "threads",
        16,
    )
    assert "worker_pool" not in config(cpu) and "worker_pool" not in config(two_gpus)
    assert config(cpu)["task_acks_late"] and config(one_gpu)["task_acks_late"]
