"""A backfill against the bare engine, in one run: the first N corpus texts as a JSON Lines file,
backfilled through Redis, a real worker process and the SQL store, against the engine embedding
the same texts in this process. The two take turns in each repeat (the worker idles while the
engine runs; this process only streams and waits during the backfill); medians are compared.
Each repeat is a new backfill name, and the content cache is emptied first, so every text is
really embedded.

    python bench/backfill.py [--texts N] [--repeats R] [--max-in-flight B]
                             [--round-trips K] [--database-url URL] [--broker-url URL] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import DEFAULT_CORPUS, DEFAULT_STORE
from bench.pipeline import (
    MODEL,
    TARGET_SHARE,
    engine_seconds,
    prepare,
    start_worker,
    stop_worker,
)
from storage.models import Embedding
from storage.session import scope, sessions_for
from tasks import backfill
from tasks.backfill import readers


def round_trips(texts: list[str], count: int) -> list[float]:
    from tasks import producer

    times = []
    for i in range(count):
        started = time.perf_counter()
        job = producer.submit([texts[i % len(texts)]])
        job.wait(timeout=120)
        job.embeddings()
        times.append((time.perf_counter() - started) * 1000)
    return times


def uncached_backfill(
    name: str, args: argparse.Namespace, source: Path, settings: Any
) -> backfill.BackfillRun:
    """A new backfill of ``source`` with no vector stored before it (the stored vectors are the
    content cache), so every text is embedded."""
    with scope(sessions_for(settings.database_url)) as session:
        session.execute(delete(Embedding))
    options = backfill.Options(
        name=f"{name}-{int(time.time())}",
        model=MODEL,
        batch_size=settings.job_batch_size,
        max_in_flight=args.max_in_flight,
    )
    return backfill.BackfillRun(readers.open_source(str(source)), options)


def interactive_latency(
    args: argparse.Namespace, env: dict[str, str], source: Path, texts: list[str], settings: Any
) -> dict[str, float]:
    """One-text round trips on an interactive worker, idle and then while a backfill runs on
    a separate bulk worker (niced, one ONNX thread, as the README advises for fleets sharing
    cores)."""
    import threading

    interactive = start_worker(env, queues="interactive")
    # The bulk worker leaves a core to the interactive one, and yields the other when asked.
    bulk_env = {**env, "EMBEDQ_WORKER_NICE": "19", "EMBEDQ_INTRA_OP_THREADS": "1"}
    bulk = start_worker(bulk_env, queues="bulk")
    try:
        round_trips(texts, 10)  # warm
        idle = round_trips(texts, args.round_trips)
        run = uncached_backfill("bench-busy", args, source, settings)
        thread = threading.Thread(target=run.run, daemon=True)
        thread.start()
        time.sleep(2)  # the bulk worker is busy
        busy = round_trips(texts, args.round_trips)
        still_running = thread.is_alive()
        thread.join()
    finally:
        stop_worker(interactive)
        stop_worker(bulk)
    return {
        "idle_p50_ms": round(statistics.median(idle), 2),
        "busy_p50_ms": round(statistics.median(busy), 2),
        "busy_over_idle": round(statistics.median(busy) / statistics.median(idle), 2),
        "backfill_ran_throughout": still_running,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = prepare(args)
    texts, env, settings, engine = bench.texts, bench.env, bench.settings, bench.engine
    database_url = bench.database_url
    source = bench.work / "texts.jsonl"
    with source.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"t{i}", "text": text}) + "\n")
    worker = start_worker(env)
    engine_s, backfill_s = [], []
    try:
        from tasks import producer

        producer.submit(texts[:64]).wait(timeout=300)  # the worker's child is warm
        engine.encode(texts[:64])
        for repeat in range(args.repeats):
            engine_s.append(engine_seconds(bench))

            run = uncached_backfill(f"bench-{repeat}", args, source, settings)
            started = time.perf_counter()
            progress = run.run()
            backfill_s.append(time.perf_counter() - started)
            if progress.done != len(texts) or progress.reused:
                raise SystemExit(f"backfill did not embed every text: {progress}")
        latency = interactive_latency(args, env, source, texts, settings)
    finally:
        stop_worker(worker)
        from tasks import producer

        producer.dispose()
    engine_rate = len(texts) / statistics.median(engine_s)
    backfill_rate = len(texts) / statistics.median(backfill_s)
    return {
        "texts": len(texts),
        "repeats": args.repeats,
        "database": database_url.split(":", 1)[0],
        "batch_size": settings.job_batch_size,
        "max_in_flight": args.max_in_flight,
        "engine_texts_per_s": round(engine_rate, 1),
        "backfill_texts_per_s": round(backfill_rate, 1),
        "backfill_share": round(backfill_rate / engine_rate, 3),
        "load_1min": round(os.getloadavg()[0], 2),
        **latency,
    }


def report(result: dict[str, Any]) -> str:
    share = result["backfill_share"]
    return "\n".join(
        [
            f"{result['texts']} corpus texts, median of {result['repeats']} interleaved repeats,"
            f" {result['database']} store, batches of {result['batch_size']}, at most"
            f" {result['max_in_flight']} in flight, load {result['load_1min']}",
            "                  texts/s  share   target  result",
            f"engine (bare)    {result['engine_texts_per_s']:8.1f}  1.000",
            f"backfill         {result['backfill_texts_per_s']:8.1f}  {share:.3f}  >={TARGET_SHARE}"
            f"   {'PASS' if share >= TARGET_SHARE else 'FAIL'}",
            f"one-text round trip on an interactive worker: p50 idle {result['idle_p50_ms']:.1f}"
            f" ms, during a backfill on a niced 1-thread bulk worker"
            f" {result['busy_p50_ms']:.1f} ms ="
            f" {result['busy_over_idle']:.2f}x (target <=2x:"
            f" {'PASS' if result['busy_over_idle'] <= 2 else 'FAIL'}; backfill running"
            f" throughout: {result['backfill_ran_throughout']})",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-in-flight", type=int, default=8)
    parser.add_argument("--round-trips", type=int, default=100)
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
