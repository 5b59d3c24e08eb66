"""What this machine can compute: its CPU's flags as the kernel reports them, and whether it
shows an NVIDIA GPU at all.

bf16 is worth running only where the CPU has bfloat16 arithmetic: AVX512-BF16 (Intel Cooper
Lake and later, AMD Zen 4 and later) or AMX (Intel Sapphire Rapids and later). Elsewhere
OpenVINO quietly keeps fp32, so embedq asks here first, to refuse a bf16 pull with a reason and
to tell an operator why a worker runs a bf16 model in fp32.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
DEVICES = Path("/dev")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The first CPU's flags in ``/proc/cpuinfo``; empty where there is no such file."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` prints it, for logs and benchmark reports."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or "unknown CPU"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or "unknown CPU"


def bf16_missing(flags: frozenset[str] | None = None) -> str | None:
    """Why this CPU cannot compute in bf16, or ``None`` when it can."""
    flags = cpu_flags() if flags is None else flags
    if any(flag in flags for flag in BF16_FLAGS):
        return None
    return (
        f"this CPU ({cpu_model()}) has neither avx512_bf16 nor amx_bf16, so bf16 would run as"
        " fp32 here; bf16 needs an Intel Xeon from Cooper Lake / Sapphire Rapids on, or an AMD"
        " EPYC from Zen 4 (Genoa) on"
    )


@lru_cache(maxsize=1)
def has_nvidia_device() -> bool:
    """Whether this machine shows an NVIDIA GPU: the driver loaded (``/proc/driver/nvidia``)
    or a device node (``/dev/nvidia0``, what a container is given)."""
    return NVIDIA_DRIVER.exists() or any(DEVICES.glob("nvidia[0-9]*"))
