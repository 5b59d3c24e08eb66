"""The job pipeline against the bare engine, in one run: producer -> Redis -> a real Celery
worker process -> the SQL store, on the same texts and the same model, CPU threads alike.

Throughput: each repeat embeds the texts once with the engine in this process (the worker idles)
and once as one job through the pipeline (this process only waits); the two take turns so noise
on a shared machine hits them alike, and medians are compared. Round trip: one-text jobs one
after another, each timed from ``submit`` until its vector is readable from the store.

    python bench/pipeline.py [--texts N] [--repeats R] [--round-trips K]
                             [--database-url URL] [--broker-url URL] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import DEFAULT_CORPUS, DEFAULT_STORE, load_texts, prepared
from storage import schema
from worker.engine import Engine
from worker.manifest import Precision
from worker.model_store import ModelStore
from worker.settings import Settings, get_settings

MODEL = "minilm-fp32"
TARGET_SHARE = 0.85  # pipeline texts/s as a share of the engine's
TARGET_P50_MS = 25.0


def start_worker(env: dict[str, str], queues: str = "interactive,bulk") -> subprocess.Popen[bytes]:
    """A real worker, as an operator would start one on this machine: prefork, one process."""
    command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "1"]
    command += ["-Q", queues, "-n", f"{queues.replace(',', '-')}@%h"]
    command += ["--without-gossip", "--without-mingle", "-l", "WARNING"]
    process = subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return process


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def stage_medians(database_url: str, job_ids: list[str]) -> dict[str, float]:
    """Medians of the worker's own timings (``batch_stats``) for the round-trip jobs."""
    from storage.models import BatchStat
    from storage.session import scope, sessions_for

    with scope(sessions_for(database_url)) as session:
        rows = session.query(BatchStat).filter(BatchStat.job_id.in_(job_ids)).all()
        columns = ("queue_wait_ms", "tokenize_ms", "inference_ms", "write_ms", "total_ms")
        return {c: round(statistics.median(getattr(r, c) for r in rows), 2) for c in columns}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


@dataclass(frozen=True)
class Bench:
    """What a pipeline benchmark runs on: the texts, a work folder, the settings the worker and
    this process share (as ``env``), a fresh Redis database and store, and the bare engine."""

    texts: list[str]
    work: Path
    env: dict[str, str]
    database_url: str
    settings: Settings
    engine: Engine


def prepare(args: argparse.Namespace) -> Bench:
    texts = load_texts(args.corpus, args.texts)
    store = ModelStore(args.model_dir)
    folder = prepared(store, MODEL, Precision.FP32, Settings(model_dir=args.model_dir))
    work = Path(tempfile.mkdtemp(prefix="embedq-bench-"))
    database_url = args.database_url or f"sqlite:///{work / 'bench.db'}"
    env = {
        "EMBEDQ_BROKER_URL": args.broker_url,
        "EMBEDQ_DATABASE_URL": database_url,
        "EMBEDQ_MODEL_DIR": str(args.model_dir),
        "EMBEDQ_DEFAULT_MODEL": MODEL,
        "EMBEDQ_PROVIDERS": "CPUExecutionProvider",
    }
    os.environ.update(env)
    get_settings.cache_clear()
    settings = get_settings()
    client = redis.Redis.from_url(args.broker_url)
    client.flushdb()
    client.close()
    schema.upgrade(database_url)
    return Bench(texts, work, env, database_url, settings, Engine.load(folder, settings))


def engine_seconds(bench: Bench) -> float:
    """One pass of the bare engine over the texts, in calls as large as it accepts."""
    step = bench.settings.max_batch_items
    started = time.perf_counter()
    for start in range(0, len(bench.texts), step):
        bench.engine.encode(bench.texts[start : start + step])
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = prepare(args)
    texts, env, settings, engine = bench.texts, bench.env, bench.settings, bench.engine
    database_url = bench.database_url

    from tasks import producer

    worker = start_worker(env)
    try:
        # Warm both: the worker's child loads the model at start; this waits for it.
        producer.submit(texts[:64]).wait(timeout=300)
        engine.encode(texts[:64])

        engine_s, pipeline_s = [], []
        for _ in range(args.repeats):
            engine_s.append(engine_seconds(bench))

            started = time.perf_counter()
            job = producer.submit(texts, queue="bulk")
            status = job.wait(timeout=1800)
            pipeline_s.append(time.perf_counter() - started)
            if status["state"] != "succeeded" or status["done"] != len(texts):
                raise SystemExit(f"pipeline job did not succeed: {status}")

        round_trips, submits, job_ids = [], [], []
        for i in range(args.round_trips):
            text = texts[i % len(texts)]
            started = time.perf_counter()
            job = producer.submit([text])
            submits.append((time.perf_counter() - started) * 1000)
            job.wait(timeout=60)
            _, vectors = job.embeddings()
            round_trips.append((time.perf_counter() - started) * 1000)
            job_ids.append(job.id)
            if vectors.shape != (1, engine.dim):
                raise SystemExit(f"round trip {i} read back {vectors.shape}")
        stages = stage_medians(database_url, job_ids)
    finally:
        stop_worker(worker)
        producer.dispose()

    engine_rate = len(texts) / statistics.median(engine_s)
    pipeline_rate = len(texts) / statistics.median(pipeline_s)
    return {
        "texts": len(texts),
        "repeats": args.repeats,
        "database": database_url.split(":", 1)[0],
        "job_batch_size": settings.job_batch_size,
        "threads": settings.threads(),
        "engine_texts_per_s": round(engine_rate, 1),
        "pipeline_texts_per_s": round(pipeline_rate, 1),
        "pipeline_share": round(pipeline_rate / engine_rate, 3),
        "round_trips": len(round_trips),
        "round_trip_p50_ms": round(percentile(round_trips, 50), 2),
        "round_trip_p99_ms": round(percentile(round_trips, 99), 2),
        "round_trip_max_ms": round(max(round_trips), 2),
        "round_trip_submit_ms": round(statistics.median(submits), 2),
        "round_trip_worker_ms": stages,
        "load_1min": round(os.getloadavg()[0], 2),
    }


def report(result: dict[str, Any]) -> str:
    share, p50 = result["pipeline_share"], result["round_trip_p50_ms"]
    return "\n".join(
        [
            f"{result['texts']} corpus texts, median of {result['repeats']} interleaved repeats,"
            f" {result['database']} store, batches of {result['job_batch_size']},"
            f" {result['threads']} ONNX threads each, load {result['load_1min']}",
            "                  texts/s  share   target  result",
            f"engine (bare)    {result['engine_texts_per_s']:8.1f}  1.000",
            f"pipeline         {result['pipeline_texts_per_s']:8.1f}  {share:.3f}  >={TARGET_SHARE}"
            f"   {'PASS' if share >= TARGET_SHARE else 'FAIL'}",
            f"one-text job round trip over {result['round_trips']} jobs: p50"
            f" {p50:.1f} ms (target <={TARGET_P50_MS:.0f} ms:"
            f" {'PASS' if p50 <= TARGET_P50_MS else 'FAIL'}), p99"
            f" {result['round_trip_p99_ms']:.1f} ms, max {result['round_trip_max_ms']:.1f} ms",
            f"  medians: submit {result['round_trip_submit_ms']:.1f} ms; in the worker: "
            + ", ".join(
                f"{k.removesuffix('_ms').replace('_', ' ')} {v:.1f}"
                for k, v in result["round_trip_worker_ms"].items()
            )
            + " ms (total = the batch in the task, queue wait = submit to task start)",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--database-url", help="default: a new SQLite file")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
