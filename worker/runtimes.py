"""The runtimes that run a prepared ONNX file, behind one small interface.

The engine tokenises, batches, pools and normalises; a ``Session`` only turns padded feeds into
the model's output. ONNX Runtime runs every model on every device and stays the runtime for
GPUs. OpenVINO runs the same ``model.onnx`` on the CPU and is the one that uses a CPU's bf16
units. ``EMBEDQ_RUNTIME`` picks: ``auto`` gives bf16 models to OpenVINO and the rest to ONNX
Runtime. Each session reports what really ran (``provider`` and ``precision``), which the
engine's statistics, ``batch_stats`` and the metrics carry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from worker import hardware, providers
from worker.errors import ModelError, ProviderError
from worker.manifest import Manifest, Precision
from worker.settings import RuntimeChoice, Settings

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


class Session(Protocol):
    """A loaded model file, ready to run padded micro-batches."""

    provider: str
    """Where it runs: an ONNX Runtime execution provider, or ``OpenVINO:CPU``."""
    precision: Precision
    """The arithmetic it really runs in (a bf16 model on a CPU without bf16 runs fp32)."""

    def run(self, feeds: Feeds) -> np.ndarray:
        """The model's chosen output for one micro-batch."""
        ...


def choose(manifest: Manifest, settings: Settings) -> RuntimeChoice:
    """The runtime for ``manifest`` under ``EMBEDQ_RUNTIME``; ``auto`` gives OpenVINO the bf16
    models only, since ONNX Runtime's CPU provider has no bf16 kernels and OpenVINO's fp32 was
    no faster than ONNX Runtime's on the machines measured (bench/README.md)."""
    if settings.runtime != "auto":
        return settings.runtime
    return "openvino" if manifest.precision is Precision.BF16 else "onnxruntime"


def describe_here(manifest: Manifest, settings: Settings) -> str:
    """What would run ``manifest`` on this machine, without loading it: the runtime, and the
    precision with the reason when it is not the manifest's."""
    runtime = choose(manifest, settings)
    if manifest.precision is not Precision.BF16:
        return f"{runtime}, {manifest.precision}"
    if runtime == "onnxruntime":
        return "onnxruntime, fp32 (ONNX Runtime has no bf16 on the CPU; see EMBEDQ_RUNTIME)"
    missing = hardware.bf16_missing()
    return "openvino, bf16" if missing is None else f"openvino, fp32: {missing}"


def open_session(
    folder: Path, manifest: Manifest, settings: Settings, device_id: int | None = None
) -> Session:
    """A session for the model file in ``folder`` on the runtime ``choose`` picks, applying the
    fallback policy when that runtime is not installed or cannot run the precision asked for."""
    path = folder / "model.onnx"
    runtime = choose(manifest, settings)
    if runtime == "openvino":
        if settings.gpu_devices:
            raise ProviderError(
                "EMBEDQ_RUNTIME=openvino runs on the CPU only; a GPU worker"
                " (EMBEDQ_GPU_DEVICES) runs ONNX Runtime: set EMBEDQ_RUNTIME=auto"
            )
        try:
            from worker import openvino_runtime
        except ImportError as exc:
            reason = f"OpenVINO is not installed ({exc}); pip install 'embedq[openvino]'"
            _fall_back(f"{manifest.name} asks for OpenVINO", reason, settings, "ONNX Runtime")
        else:
            session = openvino_runtime.OpenVinoSession.open(
                path, manifest.output, manifest.precision, settings
            )
            if manifest.precision is Precision.BF16 and session.precision is not Precision.BF16:
                _fall_back(
                    f"model {manifest.name} is bf16", session.why_not_bf16(), settings, "fp32"
                )
            return session
    elif manifest.precision is Precision.BF16:
        logger.warning(
            "bf16 model %s runs in fp32 on ONNX Runtime (EMBEDQ_RUNTIME=%s); OpenVINO runs it"
            " in bf16 on CPUs that have it",
            manifest.name,
            settings.runtime,
            extra={"model": manifest.name, "runtime": "onnxruntime", "precision": "fp32"},
        )
    return OrtSession.open(path, manifest, settings, device_id)


def _fall_back(wanted: str, reason: str, settings: Settings, instead: str) -> None:
    """Warn that ``wanted`` could not be had and ``instead`` runs, or raise under the error
    policy (``EMBEDQ_PROVIDER_FALLBACK``), as for a GPU provider that did not load."""
    if settings.fallback_policy() == "error":
        raise ProviderError(
            f"{wanted} but {reason}; refusing to run it on {instead}"
            " (EMBEDQ_PROVIDER_FALLBACK=error)"
        )
    logger.warning(
        "%s but %s; running on %s instead (EMBEDQ_PROVIDER_FALLBACK=error makes this an error)",
        wanted,
        reason,
        instead,
        extra={"wanted": wanted, "instead": instead},
    )


def session_options(settings: Settings) -> ort.SessionOptions:
    """Session options set explicitly rather than left to onnxruntime's defaults."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = settings.threads()
    options.inter_op_num_threads = 1
    if settings.worker_processes() > 1:
        # Spinning threads burn the cores that sibling worker processes need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only; provider failures are reported by embedq
    return options


class OrtSession:
    """An ONNX Runtime session on the best provider obtainable."""

    def __init__(
        self, session: ort.InferenceSession, output: str, provider: str, precision: Precision
    ) -> None:
        self._session = session
        self._outputs = [output]
        self.provider = provider
        self.precision = precision

    @classmethod
    def open(
        cls, path: Path, manifest: Manifest, settings: Settings, device_id: int | None = None
    ) -> OrtSession:
        """``device_id`` binds a GPU provider to that device; a provider that does not load is
        handled by the fallback policy (``providers.check_obtained``)."""
        built_in = providers.available()
        # A worker given GPUs asks for CUDA whatever this machine shows: if it cannot get it,
        # the fallback policy (an error, by default, for a GPU worker) says so.
        wants_gpu = bool(settings.gpu_devices) or device_id is not None
        requested = providers.choose(settings.providers, built_in, nvidia=wants_gpu or None)
        usable = [p for p in requested if p in built_in]
        with providers.NativeStderr() as captured:
            try:
                session = ort.InferenceSession(
                    str(path),
                    sess_options=session_options(settings),
                    providers=providers.with_options(usable, device_id),
                )
            except Exception as exc:  # onnxruntime raises its own untyped errors
                raise ModelError(f"onnxruntime cannot load {path}: {exc}") from exc
        reason = (
            captured.reason()
            if requested[0] in built_in
            else f"this onnxruntime build does not include it; it has {built_in}"
        )
        active = providers.check_obtained(
            requested, session.get_providers(), settings.fallback_policy(), reason
        )
        # A bf16 model's file is fp32: ONNX Runtime runs it as it is.
        precision = Precision.FP32 if manifest.precision is Precision.BF16 else manifest.precision
        return cls(session, manifest.output, active, precision)

    def run(self, feeds: Feeds) -> np.ndarray:
        (output,) = self._session.run(self._outputs, feeds)
        return np.asarray(output, dtype=np.float32)
