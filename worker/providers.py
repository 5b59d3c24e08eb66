"""Choosing ONNX Runtime execution providers, and noticing when a GPU was not obtained.

onnxruntime-gpu on a machine without usable CUDA libraries builds a CPU session after printing
an error to stderr; nothing fails, and inference is hundreds of times slower. The truth is
``session.get_providers()``: when the first provider asked for is not the first obtained, embedq
logs one warning naming both and the reason, or refuses (``EMBEDQ_PROVIDER_FALLBACK=error``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence

import onnxruntime as ort

from worker import hardware
from worker.errors import ProviderError
from worker.settings import FallbackPolicy

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# Preferred accelerators, best first, when the settings name none.
_ACCELERATORS = (
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
)


def available() -> list[str]:
    """Providers this onnxruntime build was compiled with (not a promise that they load)."""
    return list(ort.get_available_providers())


def choose(
    requested: Sequence[str], built_in: Sequence[str], nvidia: bool | None = None
) -> list[str]:
    """The provider list to hand to the session: the settings' list, else the best accelerator
    this build lists that the machine can run, always ending with the CPU so a session can be
    built. On a machine without an NVIDIA device (``nvidia``: default, ask ``hardware``) CUDA
    is not tried: onnxruntime-gpu would print a red error for each library it cannot load
    before falling back, on every CPU-only laptop that runs the main job."""
    chosen = list(requested)
    if not chosen:
        present = hardware.has_nvidia_device() if nvidia is None else nvidia
        usable = [p for p in _ACCELERATORS if p in built_in and (present or p not in _NVIDIA)]
        chosen = usable[:1]
        if not present and _NVIDIA[0] in built_in:
            _say_no_gpu()
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


_NVIDIA = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@functools.cache
def _say_no_gpu() -> None:
    """Once a process: why a CUDA build runs on the CPU."""
    logger.info(
        "no NVIDIA device on this machine: onnxruntime runs on the CPU, CUDA not tried"
        " (EMBEDQ_PROVIDERS chooses explicitly)"
    )


# Providers that take a ``device_id`` option; the CPU takes none.
_DEVICE_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "DmlExecutionProvider")


def with_options(
    names: Sequence[str], device_id: int | None
) -> list[str | tuple[str, dict[str, str]]]:
    """The provider list for ``InferenceSession``, binding GPU providers to ``device_id``."""
    if device_id is None:
        return list(names)
    return [
        (name, {"device_id": str(device_id)}) if name in _DEVICE_PROVIDERS else name
        for name in names
    ]


def check_obtained(
    requested: Sequence[str], obtained: Sequence[str], policy: FallbackPolicy, reason: str
) -> str:
    """The provider actually running; warns or raises when it is not the first one requested."""
    wanted, active = requested[0], obtained[0]
    if wanted == active:
        return active
    if policy == "error":
        raise ProviderError(
            f"execution provider {wanted} was requested but could not be used ({reason});"
            f" refusing to run on {active} (EMBEDQ_PROVIDER_FALLBACK=error)"
        )
    logger.warning(
        "execution provider %s was requested but could not be used (%s); running on %s"
        " instead, which can be hundreds of times slower (EMBEDQ_PROVIDER_FALLBACK=error"
        " makes this an error)",
        wanted,
        reason,
        active,
        extra={"requested": wanted, "provider": active},
    )
    return active


class NativeStderr:
    """Captures what native code writes to file descriptor 2 while the block runs.

    onnxruntime reports why a provider failed to load (a missing libcublas, a cuDNN mismatch)
    only on the process's stderr, below Python. Capturing it lets the fallback warning carry the
    real reason; the captured text is written back to stderr afterwards so nothing is hidden.
    """

    def __init__(self) -> None:
        self.text = ""

    def __enter__(self) -> NativeStderr:
        import sys
        import tempfile

        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        raw = self._file.read()
        self._file.close()
        self.text = raw.decode("utf-8", "replace")
        if raw:
            os.write(2, raw)

    def reason(self) -> str:
        """The most telling line onnxruntime printed, stripped of colour codes, or a default."""
        lines = [_strip_ansi(line) for line in self.text.splitlines()]
        for marker in ("Failed to load library", "Require cuDNN", "Failed to create"):
            for line in lines:
                if marker in line:
                    return line.split(" : ")[-1].split("] ")[-1].strip()
        return "onnxruntime did not create it; see its log above"


def _strip_ansi(line: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", line)
