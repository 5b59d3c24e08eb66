"""OpenVINO on the real exported all-MiniLM-L6-v2: fp32 parity, bf16 where the CPU has it (and
its refusal or fallback where it does not), with real OpenVINO and the corpus."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cosines
from worker import hardware, openvino_runtime
from worker.engine import Engine
from worker.errors import ModelError, ProviderError
from worker.manifest import Manifest, Precision
from worker.model_store import ModelStore, PullOptions
from worker.settings import Settings

pytestmark = pytest.mark.model

HAS_BF16 = hardware.bf16_missing() is None


@pytest.fixture(scope="module")
def sample(corpus: list[str]) -> list[str]:
    """500 corpus texts spread over the file, and its 20 longest (cut at 256 tokens)."""
    longest = sorted(range(len(corpus)), key=lambda i: len(corpus[i]), reverse=True)[:20]
    return [corpus[i] for i in range(0, len(corpus), len(corpus) // 480)][:480] + [
        corpus[i] for i in longest
    ]


def test_openvino_fp32_gives_sentence_transformers_vectors(
    minilm: Path,
    cpu_settings: Settings,
    sample: list[str],
    reference_vectors: Callable[[list[str]], np.ndarray],
) -> None:
    engine = Engine.load(minilm, cpu_settings.model_copy(update={"runtime": "openvino"}))
    assert (engine.provider, engine.precision) == (openvino_runtime.PROVIDER, Precision.FP32)
    encoding = engine.encode(sample)
    assert encoding.stats.provider == "OpenVINO:CPU" and encoding.stats.precision == "fp32"
    assert float(np.min(cosines(encoding.vectors, reference_vectors(sample)))) >= 0.9999


def test_a_bf16_model_runs_bf16_where_the_cpu_has_it_and_fp32_with_a_warning_elsewhere(
    bf16_model: Path,
    cpu_settings: Settings,
    sample: list[str],
    reference_vectors: Callable[[list[str]], np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.runtimes"):
        engine = Engine.load(bf16_model, cpu_settings)
    assert engine.provider == "OpenVINO:CPU"  # EMBEDQ_RUNTIME=auto gives bf16 to OpenVINO
    vectors = engine.encode(sample).vectors
    similarity = cosines(vectors, reference_vectors(sample))
    if HAS_BF16:
        assert engine.precision is Precision.BF16
        assert not caplog.records
        assert float(np.min(similarity)) >= 0.9999
        gate = Manifest.read(bf16_model).validation
        assert gate["bf16_vs_fp32_min_cosine"] >= 0.9999
    else:
        assert engine.precision is Precision.FP32
        assert "avx512_bf16" in caplog.text and "running on fp32 instead" in caplog.text
        assert float(np.min(similarity)) >= 0.9999


def test_a_bf16_model_is_refused_on_a_cpu_without_bf16_under_the_error_policy(
    bf16_model: Path, cpu_settings: Settings
) -> None:
    strict = cpu_settings.model_copy(update={"provider_fallback": "error"})
    if HAS_BF16:
        assert Engine.load(bf16_model, strict).precision is Precision.BF16
        return
    with pytest.raises(ProviderError, match=r"avx512_bf16.*EMBEDQ_PROVIDER_FALLBACK=error"):
        Engine.load(bf16_model, strict)


def test_a_bf16_pull_is_refused_when_openvino_does_not_really_compute_in_bf16(
    minilm: Path, tmp_path: Path, cpu_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second gate: the CPU's flags claim bf16 (simulated here where they do not), but the
    plugin reports after compiling that it kept fp32; nothing is installed. (The gate runs on
    the fp32 ONNX file whatever its source: an ONNX folder spares the checkpoint's export.)"""
    # The plugin's answer is simulated everywhere: on an AVX-512 CPU without bf16 it emulates
    # bf16 and says so, whatever the flags.
    monkeypatch.setattr(openvino_runtime, "really_runs", lambda compiled: Precision.FP32)
    if not HAS_BF16:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    onnx = shutil.copytree(minilm, tmp_path / "plain", ignore=shutil.ignore_patterns("manifest.*"))
    store = ModelStore(tmp_path / "models")
    settings = cpu_settings.model_copy(update={"model_dir": tmp_path / "models"})
    with pytest.raises(ModelError, match="OpenVINO kept fp32"):
        store.pull(str(onnx), "bf16", PullOptions(precision=Precision.BF16), settings)
    assert store.list() == []


def test_runtime_openvino_on_a_gpu_worker_is_refused(minilm: Path, cpu_settings: Settings) -> None:
    gpu = cpu_settings.model_copy(update={"runtime": "openvino", "gpu_devices": [0]})
    with pytest.raises(ProviderError, match="CPU only"):
        Engine.load(minilm, gpu)
