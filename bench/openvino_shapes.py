"""How OpenVINO's CPU plugin should be driven: padded widths and performance hints, measured.

The engine runs length-sorted micro-batches whose widths vary from one to the next. OpenVINO's
CPU plugin takes dynamic shapes and caches its work per shape, so the question is whether
padding every micro-batch up to a multiple of 8, 16 or 32 tokens (fewer distinct shapes, more
padding) pays, and whether ``PERFORMANCE_HINT=THROUGHPUT`` (several streams, each with part of
the cores) beats ``LATENCY`` (one stream with all of them), run synchronously as the engine does
or with an async queue keeping every stream busy. ONNX Runtime on exact widths is the baseline.
All candidates take turns in each repeat on the same micro-batches; medians are printed.

    python bench/openvino_shapes.py [--texts N] [--repeats R] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import DEFAULT_CORPUS, DEFAULT_STORE, load_texts, prepared
from worker import batching, engine, hardware, pooling
from worker.manifest import TOKENIZER_FILE, Manifest, Pooling, Precision
from worker.model_store import ModelStore
from worker.runtimes import session_options
from worker.settings import Settings

Batches = list[tuple[dict[str, np.ndarray], np.ndarray]]


def micro_batches(folder: Path, texts: list[str], bucket: int, settings: Settings) -> Batches:
    """The engine's micro-batches of ``texts``, each padded up to a multiple of ``bucket``."""
    manifest = Manifest.read(folder)
    tokenizer = engine.load_tokenizer(folder / TOKENIZER_FILE, manifest.behaviour.max_seq_length)
    encodings = tokenizer.encode_batch(texts)
    plan = batching.plan(
        [len(e.ids) for e in encodings],
        max_items=settings.micro_batch_size,
        max_tokens=settings.micro_batch_tokens,
    )
    out = []
    for indices in plan:
        feeds, mask = engine.pad([encodings[i] for i in indices], manifest.inputs)
        width = mask.shape[1]
        extra = -width % bucket
        if extra:
            feeds = {k: np.pad(v, ((0, 0), (0, extra))) for k, v in feeds.items()}
            mask = np.pad(mask, ((0, 0), (0, extra)))
        out.append((feeds, mask))
    return out


def synchronous(run: Callable[[dict[str, np.ndarray]], np.ndarray], batches: Batches) -> None:
    for feeds, mask in batches:
        pooling.pool(np.asarray(run(feeds), dtype=np.float32), mask, Pooling.MEAN)


def compiled(path: Path, hint: str, precision: str, threads: int) -> ov.CompiledModel:
    core = ov.Core()
    config = {
        "PERFORMANCE_HINT": hint,
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": precision,
    }
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def candidates(
    folder: Path, texts: list[str], precision: str, settings: Settings
) -> dict[str, Callable[[], None]]:
    path, threads = folder / "model.onnx", settings.threads()
    exact = micro_batches(folder, texts, 1, settings)
    session = ort.InferenceSession(
        str(path), sess_options=session_options(settings), providers=["CPUExecutionProvider"]
    )
    out: dict[str, Callable[[], None]] = {
        "onnxruntime fp32, exact": lambda: synchronous(lambda f: session.run(None, f)[0], exact)
    }
    latency = compiled(path, "LATENCY", precision, threads)
    request = latency.create_infer_request()
    for bucket in (1, 8, 16, 32):
        batches = exact if bucket == 1 else micro_batches(folder, texts, bucket, settings)
        label = "exact" if bucket == 1 else f"pad to x{bucket}"
        out[f"openvino LATENCY, {label}"] = lambda b=batches: synchronous(
            lambda f: request.infer(f)[0], b
        )
    throughput = compiled(path, "THROUGHPUT", precision, threads)
    request_t = throughput.create_infer_request()
    out["openvino THROUGHPUT, sync"] = lambda: synchronous(lambda f: request_t.infer(f)[0], exact)
    streams = int(throughput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def queued() -> None:
        queue = ov.AsyncInferQueue(throughput, streams)
        pooled: list[np.ndarray | None] = [None] * len(exact)

        def done(req: ov.InferRequest, i: int) -> None:
            tokens = np.asarray(req.get_output_tensor(0).data, dtype=np.float32)
            pooled[i] = pooling.pool(tokens, exact[i][1], Pooling.MEAN)

        queue.set_callback(done)
        for i, (feeds, _) in enumerate(exact):
            queue.start_async(feeds, i)
        queue.wait_all()

    out[f"openvino THROUGHPUT, async x{streams}"] = queued
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_STORE)
    parser.add_argument(
        "--corpus", type=Path, default=os.environ.get("EMBEDQ_CORPUS", DEFAULT_CORPUS)
    )
    args = parser.parse_args()
    if args.precision == "bf16" and hardware.bf16_missing() is not None:
        raise SystemExit(f"not measured: {hardware.bf16_missing()}")
    settings = Settings(model_dir=args.model_dir, providers=["CPUExecutionProvider"])
    folder = prepared(ModelStore(args.model_dir), "minilm-fp32", Precision.FP32, settings)
    texts = load_texts(args.corpus, args.texts)
    runs = candidates(folder, texts, "bf16" if args.precision == "bf16" else "f32", settings)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):  # the first round warms every candidate up
        for name, call in runs.items():
            time.sleep(0.2)
            started = time.perf_counter()
            call()
            if repeat:
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["onnxruntime fp32, exact"])
    print(
        f"{hardware.cpu_model()}, {settings.threads()} threads, {len(texts)} corpus texts in the"
        f" engine's micro-batches, OpenVINO {args.precision}, medians of {args.repeats}"
    )
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"{name:<36}{len(texts) / median:>9.1f} texts/s{base / median:>7.2f}x")


if __name__ == "__main__":
    main()
