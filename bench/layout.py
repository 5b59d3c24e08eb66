"""Worker layout on few cores: one process with all the threads against one process per core.

On a machine with C cores a CPU worker can run 1 pool process x C inference threads
(``-c 1``, ``EMBEDQ_PROCESSES=1``, the default) or C processes x 1 thread (``-c C``,
``EMBEDQ_PROCESSES=C``). Each repeat starts a real worker in each layout in turn, on Redis
database 12 and a new SQLite store, and measures with the same texts:

* throughput: one N-text job on the bulk queue, from ``submit`` until every vector is stored;
* one-text latency under a bulk load: K one-text interactive jobs, one after another, while a
  6N-text bulk job keeps the worker busy (and K with the worker idle, for reference).

Medians over the repeats are printed side by side with the ratio of the two layouts.

    python bench/layout.py [--texts N] [--repeats R] [--round-trips K] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import DEFAULT_CORPUS, DEFAULT_STORE, load_texts, prepared
from bench.pipeline import MODEL, stop_worker, use_env
from storage import schema
from worker import hardware
from worker.manifest import Precision
from worker.model_store import ModelStore
from worker.settings import Settings

REDIS = "redis://127.0.0.1:6379/12"
# The bulk job under the probes is this many times the throughput job, so that it outlasts them
# (each probe may wait for a whole bulk batch); the report says whether it did.
LOAD_FACTOR = 6


def layouts(cores: int) -> dict[str, int]:
    """Name -> pool processes: all threads in one process, or one process per core."""
    return {f"1x{cores}": 1, f"{cores}x1": cores}


def start_worker(env: dict[str, str], processes: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", str(processes)]
    command += ["-Q", "interactive,bulk", "-n", f"layout{processes}@%h"]
    command += ["--without-gossip", "--without-mingle", "-l", "WARNING"]
    worker_env = {**os.environ, **env, "EMBEDQ_PROCESSES": str(processes)}
    return subprocess.Popen(
        command,
        env=worker_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def one_text_round_trips(texts: list[str], count: int) -> list[float]:
    """Milliseconds from ``submit`` of a one-text interactive job until its vector is read."""
    from tasks import producer

    times = []
    for i in range(count):
        started = time.perf_counter()
        job = producer.submit([texts[i % len(texts)]], queue="interactive")
        job.wait(timeout=300)
        if job.embeddings()[1].shape[0] != 1:
            raise SystemExit(f"round trip {i} read back no vector")
        times.append((time.perf_counter() - started) * 1000)
        time.sleep(0.05)  # spread the probes over the bulk job's batches
    return times


def measure(env: dict[str, str], processes: int, texts: list[str], trips: int) -> dict[str, Any]:
    """Throughput of one bulk job, then one-text round trips idle and under a bulk load."""
    from tasks import producer

    worker = start_worker(env, processes)
    try:
        for _ in range(processes * 2):  # every pool process has loaded the model
            producer.submit(texts[:32], queue="bulk").wait(timeout=300)
        started = time.perf_counter()
        producer.submit(texts, queue="bulk").wait(timeout=600)
        bulk_s = time.perf_counter() - started
        idle = one_text_round_trips(texts, trips)
        load = producer.submit(texts * LOAD_FACTOR, queue="bulk")
        load_started = time.perf_counter()
        time.sleep(1.0)  # the bulk job has every pool process busy
        busy = one_text_round_trips(texts, trips)
        still_loaded = load.status()["state"] in ("queued", "running")
        load.wait(timeout=900)
        load_s = time.perf_counter() - load_started
    finally:
        stop_worker(worker)
    return {
        "bulk_texts_per_s": len(texts) / bulk_s,
        "idle_p50_ms": statistics.median(idle),
        "busy_p50_ms": statistics.median(busy),
        "busy_p99_ms": float(np.percentile(busy, 99)),
        "loaded_throughout": still_loaded,
        "bulk_under_probes_texts_per_s": LOAD_FACTOR * len(texts) / load_s,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    texts = load_texts(args.corpus, args.texts)
    settings = Settings(model_dir=args.model_dir, providers=["CPUExecutionProvider"])
    prepared(ModelStore(args.model_dir), MODEL, Precision.FP32, settings)
    work = Path(tempfile.mkdtemp(prefix="embedq-layout-"))
    database_url = f"sqlite:///{work / 'embedq.db'}"
    schema.upgrade(database_url)
    redis.Redis.from_url(REDIS).flushdb()
    env = use_env(REDIS, database_url, args.model_dir)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in layouts(cores)}
    try:
        for _ in range(args.repeats):
            for name, processes in layouts(cores).items():
                results[name].append(measure(env, processes, texts, args.round_trips))
    finally:
        from tasks import producer

        producer.dispose()
    keys = [k for k in next(iter(results.values()))[0] if k != "loaded_throughout"]
    medians = {
        name: {k: round(statistics.median(r[k] for r in runs), 2) for k in keys}
        | {"loaded_throughout": all(r["loaded_throughout"] for r in runs)}
        for name, runs in results.items()
    }
    return {
        "cpu": hardware.cpu_model(),
        "cores": cores,
        "texts": len(texts),
        "repeats": args.repeats,
        "round_trips": args.round_trips,
        "layouts": medians,
    }


def report(result: dict[str, Any]) -> str:
    names = list(result["layouts"])
    a, b = (result["layouts"][n] for n in names)
    rows = [
        ("bulk job texts/s", "bulk_texts_per_s"),
        ("one-text p50, idle (ms)", "idle_p50_ms"),
        ("one-text p50, under bulk (ms)", "busy_p50_ms"),
        ("one-text p99, under bulk (ms)", "busy_p99_ms"),
        ("bulk texts/s while probed", "bulk_under_probes_texts_per_s"),
    ]
    lines = [
        f"{result['cpu']}, {result['cores']} cores; {result['texts']} corpus texts,"
        f" medians of {result['repeats']} repeats, {result['round_trips']} round trips each",
        f"{'':<32}{names[0]:>10}{names[1]:>10}{names[1] + '/' + names[0]:>12}",
    ]
    for label, key in rows:
        lines.append(f"{label:<32}{a[key]:>10.1f}{b[key]:>10.1f}{b[key] / a[key]:>12.2f}")
    loaded = a["loaded_throughout"] and b["loaded_throughout"]
    lines.append(f"bulk job still running after the last probe: {'yes' if loaded else 'NO'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000, help="first N corpus lines")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--round-trips", type=int, default=30)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_STORE)
    parser.add_argument(
        "--corpus", type=Path, default=os.environ.get("EMBEDQ_CORPUS", DEFAULT_CORPUS)
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
