"""Model FLOPs of a benchmark run, and the CPU's own peak arithmetic rate to compare them with.

Model FLOPs replay the batches a candidate really runs (the engine's length-sorted
micro-batches, or sentence-transformers' batches) through ``FORMULA``.

Peak = cores used x clock x operations per cycle per core. The operations per cycle come from
the instruction set the kernel's flags report (``/proc/cpuinfo``) and the vendor's published
execution units, in one table (``per_cycle``); the clock is ``cpu MHz`` of the first CPU, which
under a hypervisor is the nominal clock it reports and on bare metal the clock at the moment it
was read (turbo can exceed either). A multiply-add counts as 2, in every precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from worker import batching, hardware
from worker.settings import Settings

# Flags the report shows: what the fp32, int8 and bf16 rows below depend on.
SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16")
ZEN5_FAMILY = 0x1A  # AMD family 26: Zen 5, the first AMD core with 512-bit FMA datapaths

HIDDEN, LAYERS = 384, 6  # all-MiniLM-L6-v2
FORMULA = "per micro-batch: rows * L * (2*s*(4*h*h + 2*h*4h) + 2*2*s*s*h), h=384, L=6, s=width"
ST_BATCH = 32  # sentence-transformers' batch size in the benchmark


def batch_flops(rows: int, s: int) -> float:
    """FLOPs of one micro-batch of ``rows`` texts padded to ``s`` tokens (``FORMULA``)."""
    h = HIDDEN
    return rows * LAYERS * (2 * s * (4 * h * h + 2 * h * 4 * h) + 2 * 2 * s * s * h)


def plan_flops(lengths: list[int], settings: Settings) -> tuple[float, int]:
    """FLOPs and padded tokens of the engine's micro-batches for texts of ``lengths`` tokens,
    replaying its plan (calls of ``max_batch_items`` texts, each sorted and split)."""
    flops, padded, step = 0.0, 0, settings.max_batch_items
    for start in range(0, len(lengths), step):
        chunk = lengths[start : start + step]
        for group in batching.plan(
            chunk, max_items=settings.micro_batch_size, max_tokens=settings.micro_batch_tokens
        ):
            rows, s = len(group), max(chunk[i] for i in group)
            padded, flops = padded + rows * s, flops + batch_flops(rows, s)
    return flops, padded


def st_flops(texts: list[str], lengths: list[int]) -> tuple[float, int]:
    """FLOPs and padded tokens of sentence-transformers' batches: texts sorted by length in
    characters, longest first, in batches of ``ST_BATCH`` padded to their longest."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    flops, padded = 0.0, 0
    for start in range(0, len(order), ST_BATCH):
        batch = order[start : start + ST_BATCH]
        rows, s = len(batch), max(lengths[i] for i in batch)
        padded, flops = padded + rows * s, flops + batch_flops(rows, s)
    return flops, padded


@dataclass(frozen=True)
class Peak:
    """The peak of ``cores`` cores in one precision, and the instruction set it assumes."""

    kind: str
    isa: str
    per_cycle: int
    cores: int
    mhz: float

    @property
    def gflops(self) -> float:
        return self.cores * self.mhz * self.per_cycle / 1000


@lru_cache(maxsize=1)
def cpu_fields() -> dict[str, str]:
    """The first CPU's fields in ``/proc/cpuinfo`` (``vendor_id``, ``cpu family``, ``cpu MHz``,
    ...); empty where there is no such file."""
    try:
        text = hardware.CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first CPU's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def per_cycle(kind: str, flags: frozenset[str], vendor: str, family: int) -> tuple[int, str] | None:
    """Peak operations per cycle per core in ``kind`` (fp32, bf16, int8) and where the figure
    comes from, or ``None`` where the CPU has no instructions for that precision.

    fp32, FMA: units x lanes x 2. Intel AVX-512 server cores have 2 FMA units of 16 lanes (64;
    some Xeon Bronze/Silver parts have one, half of it); AMD Zen 4 runs AVX-512 double-pumped on
    its two 256-bit units, like AVX2 everywhere (2 x 8 x 2 = 32); Zen 5 has 512-bit units (64).
    Zen 1 has 128-bit units, half the AVX2 row.
    bf16: AMX (amx_bf16) multiplies a 16x32 by a 32x16 tile, 8192 multiply-adds, every 16
    cycles: 1024. AVX512-BF16's vdpbf16ps does 32 bf16 products into 16 fp32 lanes: 2 units x 32
    x 2 = 128 on Intel, 64 on Zen 4 (double-pumped), 128 on Zen 5.
    int8: AMX (amx_int8) 16x64 by 64x16 tiles every 16 cycles: 2048. vpdpbusd (VNNI) does 64
    u8 x s8 multiply-adds per 512-bit instruction: 2 units x 64 x 2 = 256 (avx512_vnni on Intel
    and Zen 5), 128 on Zen 4 and for the 256-bit avx_vnni. AVX2 has no int8 dot product: a
    vpmaddubsw then a vpmaddwd per 32 multiply-adds, two such instructions per cycle: 64.
    """
    zen4 = vendor == "AuthenticAMD" and family < ZEN5_FAMILY  # Zen 4 is the first with AVX-512
    if kind == "bf16":
        if "amx_bf16" in flags:
            return 1024, "AMX bf16 (TMUL)"
        if "avx512_bf16" in flags:
            return (64, "AVX512-BF16, Zen 4 double-pumped") if zen4 else (128, "AVX512-BF16")
        return None
    if kind == "int8":
        if "amx_int8" in flags:
            return 2048, "AMX int8 (TMUL)"
        if "avx512_vnni" in flags:
            return (128, "AVX512-VNNI, Zen 4 double-pumped") if zen4 else (256, "AVX512-VNNI")
        if "avx_vnni" in flags:
            return 128, "AVX-VNNI (256-bit)"
        if "avx2" in flags:
            return 64, "AVX2 vpmaddubsw + vpmaddwd"
        return None
    if "avx512f" in flags:
        if not zen4:
            return 64, "AVX-512 FMA, 2 units x 16 lanes"
        return 32, "AVX-512 on Zen 4, double-pumped 256-bit FMA"
    if "fma" in flags:
        return 32, "AVX2 FMA, 2 units x 8 lanes"
    return (16, "AVX, no FMA") if "avx" in flags else (8, "SSE, no FMA")


def peak(kind: str, cores: int) -> Peak:
    """The peak of ``cores`` cores of this CPU in ``kind``; a precision the CPU has no
    instructions for gets the fp32 peak (its arithmetic runs there)."""
    fields, flags = cpu_fields(), hardware.cpu_flags()
    vendor, family = fields.get("vendor_id", ""), int(fields.get("cpu family", "0") or 0)
    found = per_cycle(kind, flags, vendor, family)
    if found is None:
        fp32 = per_cycle("fp32", flags, vendor, family)
        ops, isa = fp32 if fp32 is not None else (8, "SSE")
        found, kind = (ops, f"{isa} (no {kind} instructions)"), "fp32"
    ops, isa = found
    return Peak(kind, isa, ops, cores, float(fields.get("cpu MHz", "0") or 0))


def clock_note() -> str:
    """Where the clock in the peak comes from."""
    mhz = cpu_fields().get("cpu MHz", "?")
    if "hypervisor" in hardware.cpu_flags():
        return f"clock {mhz} MHz is /proc/cpuinfo's cpu MHz, the nominal clock a hypervisor reports"
    return f"clock {mhz} MHz is /proc/cpuinfo's cpu MHz when read; turbo can run above it"
