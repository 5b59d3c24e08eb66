import logging
from pathlib import Path

import pytest

from worker import hardware, providers
from worker.errors import ProviderError

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def test_default_is_the_best_listed_accelerator_then_cpu() -> None:
    gpu = ["TensorrtExecutionProvider", CUDA, CPU]
    assert providers.choose([], gpu, nvidia=True) == [CUDA, CPU]
    assert providers.choose([], [CPU], nvidia=True) == [CPU]
    assert providers.choose([], ["CoreMLExecutionProvider", CPU]) == [
        "CoreMLExecutionProvider",
        CPU,
    ]


def test_without_an_nvidia_device_cuda_is_not_tried_and_that_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    providers._say_no_gpu.cache_clear()
    caplog.set_level(logging.INFO, logger="worker.providers")
    gpu = ["TensorrtExecutionProvider", CUDA, CPU]
    assert providers.choose([], gpu, nvidia=False) == [CPU]
    assert providers.choose([], gpu, nvidia=False) == [CPU]
    assert [record.levelno for record in caplog.records] == [logging.INFO]
    assert "no NVIDIA device on this machine" in caplog.records[0].getMessage()
    assert providers.choose([CUDA], gpu, nvidia=False) == [CUDA, CPU]  # asked for: tried


def test_an_nvidia_device_is_seen_by_its_driver_or_its_device_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hardware, "NVIDIA_DRIVER", tmp_path / "driver" / "version")
    monkeypatch.setattr(hardware, "DEVICES", tmp_path)
    found = []
    for make in (None, tmp_path / "nvidia0", tmp_path / "driver" / "version"):
        if make is not None:
            make.parent.mkdir(exist_ok=True)
            make.write_text("")
        hardware.has_nvidia_device.cache_clear()
        found.append(hardware.has_nvidia_device())
    hardware.has_nvidia_device.cache_clear()
    assert found == [False, True, True]


def test_requested_providers_are_kept_in_order_with_cpu_last() -> None:
    assert providers.choose(["DmlExecutionProvider"], [CPU]) == ["DmlExecutionProvider", CPU]
    assert providers.choose([CPU], [CUDA, CPU]) == [CPU]


def test_getting_the_requested_provider_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    assert providers.check_obtained([CUDA, CPU], [CUDA, CPU], "error", "n/a") == CUDA
    assert not caplog.records


def test_fallback_warns_once_naming_provider_reason_and_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        active = providers.check_obtained([CUDA, CPU], [CPU], "warn", "libcublasLt.so.13 missing")
    assert active == CPU
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    for part in (CUDA, CPU, "libcublasLt.so.13 missing"):
        assert part in record.getMessage()


def test_fallback_is_an_error_when_the_policy_says_so() -> None:
    with pytest.raises(
        ProviderError, match=r"CUDAExecutionProvider.*refusing to run on CPUExecutionProvider"
    ):
        providers.check_obtained([CUDA, CPU], [CPU], "error", "no driver")


def test_native_stderr_reason_is_the_loader_error() -> None:
    captured = providers.NativeStderr()
    captured.text = (
        "\x1b[1;31m2026 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] /src/x.cc:1"
        " onnxruntime::Provider& Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library"
        " libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared"
        " object file\x1b[m\n"
    )
    assert captured.reason().startswith("Failed to load library libonnxruntime_providers_cuda.so")


def test_gpu_providers_are_bound_to_the_device_and_the_cpu_is_left_alone() -> None:
    names = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers.with_options(names, None) == names
    assert providers.with_options(names, 3) == [
        ("CUDAExecutionProvider", {"device_id": "3"}),
        "CPUExecutionProvider",
    ]


@pytest.mark.parametrize(("index", "device"), [(0, 4), (1, 6), (2, 4), (None, 4)])
def test_each_pool_process_takes_the_device_at_its_index(index: int | None, device: int) -> None:
    from worker.lifecycle import device_for
    from worker.settings import Settings

    assert device_for(Settings(gpu_devices=[4, 6]), index) == device
    assert device_for(Settings(), index) is None
