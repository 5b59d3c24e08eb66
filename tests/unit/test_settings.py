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
