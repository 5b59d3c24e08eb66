"""What the HTTP API adds: ``POST /v1/embeddings`` against ``producer.submit`` in the same run.

Starts a real worker (one prefork process, Redis database 10, a new SQLite or PostgreSQL store)
and a real ``embedq serve`` on a free loopback port, then, interleaved in blocks so both see
the same machine:

* one short text per request, one request at a time: the in-process round trip
  (``producer.submit([text]).wait()`` and reading the vector back) against the same text
  through HTTP (OpenAI's ``embeddings.create`` shape, with httpx keeping its connection);
  p50/p99 of each and the difference of the medians (the issue's target: at most 3 ms);
* per request, the round trip less the time the server says it spent (its ``Server-Timing``
  header): what the HTTP layer costs, set beside the same figure for ``bench/http_floor.py``,
  the same HTTP stack around a handler that only waits as long as embedq's server does;
* requests/s with C concurrent HTTP clients (threads, one connection each) for a fixed time,
  with the p50/p99 latency they saw, against C threads calling the producer directly.

    python bench/api.py [--round-trips N] [--concurrency C] [--seconds S]
                        [--database-url URL] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import DEFAULT_CORPUS, DEFAULT_STORE, load_texts, prepared
from bench.pipeline import MODEL, percentile, start_worker, stop_worker, use_env
from storage import schema
from worker import hardware
from worker.manifest import Precision
from worker.model_store import ModelStore
from worker.settings import Settings

REDIS = "redis://127.0.0.1:6379/10"  # the tests use 11, the other benchmarks 12-14
KEY = "sk-bench-api"
WARM_UP = 20
BLOCK = 20
TARGET_MS = 3.0
VARIANTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "--no-access-log": (("--no-access-log",), {}),
    "no rate limit": ((), {"EMBEDQ_API_RATE_LIMIT": "0"}),
    "neither, and no keys": (("--no-access-log", "--insecure-no-auth"), {}),
}
"""``embedq serve`` configurations measured beside the default: what each feature costs."""
# Counted as in production (a Redis INCR per request) but never reached by the run.
RATE_LIMIT = 10**9


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(
    command: list[str], env: dict[str, str], port: int, ready: str
) -> tuple[subprocess.Popen[bytes], str]:
    """Start an HTTP server and wait until ``ready`` answers 200."""
    process = subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + ready, timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    stop_worker(process)
    raise SystemExit(f"{' '.join(command[1:3])} did not become ready")


def start_serve(
    env: dict[str, str], options: tuple[str, ...] = (), changed: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "tasks.cli", "serve", "--port", str(port), *options]
    keys = {"EMBEDQ_API_KEYS": KEY, "EMBEDQ_API_RATE_LIMIT": str(RATE_LIMIT)}
    return launch(command, {**env, **keys, **(changed or {})}, port, "/health")


def start_floor(wait_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    floor = Path(__file__).with_name("http_floor.py")
    command = [sys.executable, str(floor), "--port", str(port), "--wait-ms", f"{wait_ms:.3f}"]
    return launch(command, {}, port, "/openapi.json")


def via_producer(text: str) -> None:
    from tasks import producer

    job = producer.submit([text], queue="interactive")
    job.wait(timeout=60)
    _, vectors = job.embeddings()
    assert vectors.shape[0] == 1


def server_ms(answer: httpx.Response) -> float:
    """The time the server says it spent in the request (its ``Server-Timing`` phases)."""
    phases = answer.headers.get("server-timing", "").split(",")
    return sum(float(part.split(";dur=")[1]) for part in phases if ";dur=" in part)


def http_call(
    client: httpx.Client, url: str, inside: list[float] | None = None
) -> Callable[[str], None]:
    """One ``POST /v1/embeddings``; ``inside`` collects what the server spent in each."""

    def call(text: str) -> None:
        answer = client.post(
            url + "/v1/embeddings",
            json={"input": text, "model": MODEL, "encoding_format": "float"},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
        answer.raise_for_status()
        assert len(answer.json()["data"][0]["embedding"]) > 0
        if inside is not None:
            inside.append(server_ms(answer))

    return call


def timed(call: Callable[[str], None], text: str) -> float:
    started = time.perf_counter()
    call(text)
    return (time.perf_counter() - started) * 1000


def sequential(
    servers: dict[str, str], texts: list[str], count: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], subprocess.Popen[bytes]]:
    """One request at a time, in blocks alternating between the paths: the producer, each
    ``embedq serve`` (``http`` is the default configuration), and the HTTP floor, started once
    the warm-up says how long the server waits. Returns the round trips by path and the time
    each HTTP server reported spending."""
    trips: dict[str, list[float]] = {"producer": [], **{name: [] for name in servers}}
    inside: dict[str, list[float]] = {name: [] for name in [*servers, "floor"]}
    with httpx.Client() as client:
        paths = {"producer": via_producer}
        paths |= {name: http_call(client, url, inside[name]) for name, url in servers.items()}
        for i in range(WARM_UP):
            for call in paths.values():
                call(texts[i % len(texts)])
        floor, floor_url = start_floor(statistics.median(inside["http"]))
        paths["floor"] = http_call(client, floor_url, inside["floor"])
        trips["floor"] = []
        for i in range(WARM_UP):
            paths["floor"](texts[i % len(texts)])
        for values in inside.values():
            values.clear()
        done = 0
        while done < count:
            for name, call in paths.items():
                for i in range(done, min(done + BLOCK, count)):
                    trips[name].append(timed(call, texts[i % len(texts)]))
            done += BLOCK
    return trips, inside, floor


def paired(client: list[float], server: list[float]) -> dict[str, float]:
    """Request by request: the client's round trip less the server's own phases."""
    layer = [c - s for c, s in zip(client, server, strict=True)]
    return {"p50_ms": statistics.median(layer), "p99_ms": percentile(layer, 99)}


def concurrent(url: str | None, texts: list[str], clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads sending one-text requests for ``seconds``; ``url`` None: the
    producer in this process."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client_loop(index: int) -> None:
        with httpx.Client() as client:
            call = via_producer if url is None else http_call(client, url)
            mine, i = [], index
            while time.monotonic() < stop:
                mine.append(timed(call, texts[i % len(texts)]))
                i += clients
            with lock:
                latencies.extend(mine)

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "requests": len(latencies),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    texts = [t[:120] for t in load_texts(args.corpus, 400)]
    settings = Settings(model_dir=args.model_dir, providers=["CPUExecutionProvider"])
    prepared(ModelStore(args.model_dir), MODEL, Precision.FP32, settings)
    work = Path(tempfile.mkdtemp(prefix="embedq-api-bench-"))
    database_url = args.database_url or f"sqlite:///{work / 'embedq.db'}"
    schema.upgrade(database_url)
    redis.Redis.from_url(REDIS).flushdb()
    env = use_env(REDIS, database_url, args.model_dir)
    worker = start_worker(env, log=work / "worker.log")
    serves = {"http": start_serve(env)}
    serves |= {name: start_serve(env, *variant) for name, variant in VARIANTS.items()}
    url = serves["http"][1]
    print(f"worker log: {work / 'worker.log'}", file=sys.stderr)
    floor = None
    try:
        servers = {name: address for name, (_, address) in serves.items()}
        trips, inside, floor = sequential(servers, texts, args.round_trips)
        loads = {
            "producer": concurrent(None, texts, args.concurrency, args.seconds),
            "http": concurrent(url, texts, args.concurrency, args.seconds),
        }
    finally:
        from tasks import producer

        for process, _ in serves.values():
            stop_worker(process)
        if floor is not None:
            stop_worker(floor)
        stop_worker(worker)
        producer.dispose()
    one = {
        name: {"p50_ms": statistics.median(values), "p99_ms": percentile(values, 99)}
        for name, values in trips.items()
    }
    one["server"] = {"p50_ms": statistics.median(inside["http"])}
    return {
        "cpu": hardware.cpu_model(),
        "python": platform.python_version(),
        "store": database_url.split(":", 1)[0],
        "round_trips": args.round_trips,
        "one_text": one,
        "http_adds_ms": one["http"]["p50_ms"] - one["producer"]["p50_ms"],
        "http_layer": {name: paired(trips[name], inside[name]) for name in inside},
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "concurrent": loads,
    }


def spread(figures: dict[str, float]) -> str:
    return f"p50 {figures['p50_ms']:5.2f} ms  p99 {figures['p99_ms']:5.2f} ms"


def layers(result: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    named = {"http": "embedq serve (as by default)", **{v: f"  {v}" for v in VARIANTS}}
    wait = result["one_text"]["server"]["p50_ms"]
    named["floor"] = f"HTTP floor (a {wait:.1f} ms wait)"
    return [(named[name], layer) for name, layer in result["http_layer"].items()]


def report(result: dict[str, Any]) -> str:
    one, loads = result["one_text"], result["concurrent"]
    verdict = "PASS" if result["http_adds_ms"] <= TARGET_MS else "MISS"
    return "\n".join(
        [
            f"{result['cpu']}, {result['store']} store, one worker process, loopback",
            f"one short text, {result['round_trips']} sequential round trips each (interleaved):",
            f"  producer.submit + wait + read  p50 {one['producer']['p50_ms']:6.2f} ms"
            f"  p99 {one['producer']['p99_ms']:6.2f} ms",
            f"  POST /v1/embeddings            p50 {one['http']['p50_ms']:6.2f} ms"
            f"  p99 {one['http']['p99_ms']:6.2f} ms",
            f"  HTTP adds {result['http_adds_ms']:+.2f} ms at p50"
            f" (target <= {TARGET_MS:g} ms: {verdict})",
            "per request, the round trip less the time the server reports (Server-Timing):",
            *(f"  {label:34s} {spread(layer)}" for label, layer in layers(result)),
            "  (the floor: bench/http_floor.py, uvicorn + FastAPI around a handler that waits)",
            f"{result['concurrency']} concurrent clients for {result['seconds']:g} s each:",
            *(
                f"  {name:8s} {load['requests_per_s']:7.1f} requests/s"
                f"  p50 {load['p50_ms']:7.1f} ms  p99 {load['p99_ms']:7.1f} ms"
                for name, load in loads.items()
            ),
            f"  HTTP / producer requests/s: "
            f"{loads['http']['requests_per_s'] / loads['producer']['requests_per_s']:.2f}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--database-url", help="default: a new SQLite store")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
