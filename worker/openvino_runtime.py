"""OpenVINO's CPU plugin running a prepared ``model.onnx``: fp32, or bf16 where the CPU has it.

Importing this module needs the ``openvino`` package (``pip install 'embedq[openvino]'``); the
rest of embedq imports it only when a model is to run on OpenVINO.

Settings chosen by measuring all-MiniLM-L6-v2 on 2 cores (see bench/README.md):
* One stream, ``PERFORMANCE_HINT=LATENCY``, one infer request reused: the engine runs its
  length-sorted micro-batches one after another. ``THROUGHPUT`` splits the cores into streams
  that only pay off with several requests in flight; run synchronously it halved throughput.
* Dynamic shapes as they come: the CPU plugin caches per shape, and padding widths up to
  multiples of 8, 16 or 32 tokens gained nothing over exact widths.
* The inference precision is always set explicitly: on a CPU with bf16 units OpenVINO computes
  in bf16 unless told otherwise, which would change an fp32 model's vectors behind its manifest.
  After compiling, the plugin is asked which precision it really took, since it quietly keeps
  fp32 on a CPU without bf16.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import openvino as ov

from worker import hardware
from worker.errors import ModelError
from worker.manifest import Precision
from worker.settings import Settings

logger = logging.getLogger(__name__)

PROVIDER = "OpenVINO:CPU"
_OV_TYPES = {Precision.BF16: "bf16", Precision.FP32: "f32"}


def compile_config(precision: Precision, settings: Settings) -> dict[str, object]:
    """The CPU plugin's properties for one worker process."""
    config: dict[str, object] = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": settings.threads(),
        "INFERENCE_PRECISION_HINT": _OV_TYPES.get(precision, "f32"),
    }
    if settings.worker_processes() > 1:
        # Pinned threads of sibling processes would fight over the same cores.
        config["ENABLE_CPU_PINNING"] = False
    return config


def really_runs(compiled: ov.CompiledModel) -> Precision:
    """The precision the plugin took for ``compiled`` (``f32`` or ``bf16``). The property is an
    ``ov.Type``, whose text is ``<Type: 'bfloat16'>``: compared as a type, not as text."""
    taken = compiled.get_property("INFERENCE_PRECISION_HINT")
    return Precision.BF16 if taken == ov.Type.bf16 else Precision.FP32


class OpenVinoSession:
    """One compiled model and one reused infer request."""

    provider = PROVIDER

    def __init__(self, compiled: ov.CompiledModel, output: str, precision: Precision) -> None:
        self._request = compiled.create_infer_request()
        self._inputs = [port.any_name for port in compiled.inputs]
        self._output = compiled.output(output)
        self.precision = precision

    @classmethod
    def open(
        cls, path: Path, output: str, precision: Precision, settings: Settings
    ) -> OpenVinoSession:
        """Compile ``path`` for this CPU asking for ``precision``; the session's ``precision``
        is what the plugin really took (a bf16 request on a CPU without bf16 gives fp32, which
        the caller judges by its fallback policy)."""
        if precision is Precision.BF16 and hardware.bf16_missing() is not None:
            # The plugin accepts bf16 on any AVX-512 CPU and emulates it there, slower than
            # fp32 and no more exact: bf16 only where the CPU computes it.
            precision = Precision.FP32
        try:
            core = ov.Core()
            compiled = core.compile_model(
                core.read_model(str(path)), "CPU", compile_config(precision, settings)
            )
        except RuntimeError as exc:  # OpenVINO raises RuntimeError subclasses for any failure
            raise ModelError(f"OpenVINO cannot load {path}: {exc}") from exc
        ran = really_runs(compiled) if precision in _OV_TYPES else precision
        logger.info(
            "openvino compiled: model=%s precision=%s threads=%d",
            path.parent.name,
            ran,
            settings.threads(),
            extra={"runtime": "openvino", "precision": str(ran)},
        )
        return cls(compiled, output, ran)

    def why_not_bf16(self) -> str:
        """Why a bf16 request ran in fp32: the CPU's flags, or the plugin's own choice."""
        missing = hardware.bf16_missing()
        return missing or f"OpenVINO kept {self.precision} on this CPU ({hardware.cpu_model()})"

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        result = self._request.infer({name: feeds[name] for name in self._inputs})
        return np.asarray(result[self._output], dtype=np.float32)
