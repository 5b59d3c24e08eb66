"""Which runtime runs a model, and what a CPU without bf16 gets: the flag check, the choice
under ``EMBEDQ_RUNTIME``, and the refusal of a bf16 pull, without loading a model."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker import hardware, runtimes
from worker.errors import ModelError
from worker.manifest import Behaviour, Manifest, Pooling, Precision
from worker.model_store import ModelStore, PullOptions
from worker.settings import Settings

ZEN3 = frozenset(["fpu", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "vaes"])
GENOA = ZEN3 | {"avx512f", "avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN3 | {"avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}


def manifest(precision: Precision) -> Manifest:
    return Manifest(
        name="m",
        source="memory",
        onnx_sha256="0" * 64,
        dim=4,
        behaviour=Behaviour(max_seq_length=8, pooling=Pooling.MEAN, normalize=True),
        precision=precision,
        inputs=("input_ids", "attention_mask"),
        output="last_hidden_state",
        created_at=datetime.now(UTC),
        created_by="copied",
    )


@pytest.mark.parametrize("flags", [GENOA, SAPPHIRE_RAPIDS], ids=["avx512_bf16", "amx_bf16"])
def test_a_cpu_with_avx512_bf16_or_amx_can_run_bf16(flags: frozenset[str]) -> None:
    assert hardware.bf16_missing(flags) is None


def test_a_cpu_without_them_is_told_why_not() -> None:
    reason = hardware.bf16_missing(ZEN3)
    assert reason is not None and "avx512_bf16" in reason and "amx_bf16" in reason


def test_the_flags_are_read_from_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512_bf16\n"
    )
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    hardware.cpu_flags.cache_clear()
    hardware.cpu_model.cache_clear()
    try:
        assert hardware.cpu_flags() == {"fpu", "avx2", "avx512_bf16"}
        assert hardware.cpu_model() == "AMD EPYC 9654"
        assert hardware.bf16_missing() is None
    finally:
        hardware.cpu_flags.cache_clear()
        hardware.cpu_model.cache_clear()


@pytest.mark.parametrize(
    ("setting", "precision", "runtime"),
    [
        ("auto", Precision.BF16, "openvino"),
        ("auto", Precision.FP32, "onnxruntime"),
        ("auto", Precision.INT8, "onnxruntime"),
        ("auto", Precision.FP16, "onnxruntime"),
        ("onnxruntime", Precision.BF16, "onnxruntime"),
        ("openvino", Precision.FP32, "openvino"),
        ("openvino", Precision.INT8, "openvino"),
    ],
)
def test_auto_gives_openvino_the_bf16_models_only(
    setting: str, precision: Precision, runtime: str
) -> None:
    settings = Settings(runtime=setting)  # type: ignore[arg-type]
    assert runtimes.choose(manifest(precision), settings) == runtime


def test_show_says_a_bf16_model_runs_fp32_on_a_cpu_without_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ZEN3)
    described = runtimes.describe_here(manifest(Precision.BF16), Settings())
    assert described.startswith("openvino, fp32: ") and "avx512_bf16" in described
    monkeypatch.setattr(hardware, "cpu_flags", lambda: GENOA)
    assert runtimes.describe_here(manifest(Precision.BF16), Settings()) == "openvino, bf16"


def test_a_bf16_pull_is_refused_on_a_cpu_without_bf16_before_anything_is_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ZEN3)
    missing_source = tmp_path / "no-such-folder"
    with pytest.raises(ModelError, match=r"cannot prepare a bf16 model here: .*avx512_bf16"):
        ModelStore(tmp_path / "models").pull(
            str(missing_source), "m", PullOptions(precision=Precision.BF16), Settings()
        )
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("taken", "ran"), [("bf16", Precision.BF16), ("f32", Precision.FP32), ("f16", Precision.FP32)]
)  # names of ov.Type's members
def test_the_precision_openvino_took_is_read_as_a_type(taken: str, ran: Precision) -> None:
    """OpenVINO answers the property as an ``ov.Type`` whose text is ``<Type: 'bfloat16'>``:
    read as text, no compiled model ever looked bf16, so every bf16 pull was refused on a CPU
    with bf16 (found on an AMD EPYC with avx512_bf16, 2026-11-29)."""
    import openvino as ov

    from worker.openvino_runtime import really_runs

    class Compiled:
        def get_property(self, name: str) -> object:
            assert name == "INFERENCE_PRECISION_HINT"
            return getattr(ov.Type, taken)

    assert really_runs(Compiled()) == ran  # type: ignore[arg-type]
