"""What one hostile or careless client does to a live ``embedq serve``, before and after.

For each side (``--before-ref REF``: that commit's code, unpacked with ``git archive``; then this
tree) it starts an ``embedq serve`` on a new SQLite store and Redis database 10, and measures:

* **a 100 MB header**: one client sends ``Authorization: Bearer`` followed by 100 MiB, 1 MiB
  at a time; how long until the server refuses it (answers or closes), how much the serve
  process grew (RSS), and ``GET /health`` from another client meanwhile (p50);
* **/health while 200 requests wait**: 200 ``/v1/embeddings`` requests for a model no worker
  runs, at once; ``GET /health`` every 50 ms while they wait (p50, p99), and when the slowest
  waiting request got its answer (the wait timeout is ``--wait`` seconds);
* **one key against another**: key A sends 100,000 texts in one request while key B asks for
  one text; how long B waits (a real CPU worker runs the model).

    python bench/hostile.py [--before-ref REF] [--wait 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from bench.api import free_port  # noqa: E402
from bench.engine import DEFAULT_STORE, prepared  # noqa: E402
from bench.pipeline import MODEL, percentile, start_worker, stop_worker, use_env  # noqa: E402
from worker import hardware  # noqa: E402
from worker.manifest import Precision  # noqa: E402
from worker.model_store import ModelStore  # noqa: E402
from worker.settings import Settings  # noqa: E402

REDIS = "redis://127.0.0.1:6379/10"
KEYS = ("sk-hostile-a", "sk-hostile-b")
MB = 1024**2


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_serve(tree: Path, env: dict[str, str], wait_s: float) -> tuple[Any, str]:
    port = free_port()
    settings = {
        **env,
        "EMBEDQ_API_KEYS": ",".join(KEYS),
        "EMBEDQ_API_RATE_LIMIT": "0",
        "EMBEDQ_API_WAIT_TIMEOUT": str(wait_s),
        "PYTHONPATH": str(tree),
    }
    command = [sys.executable, "-m", "tasks.cli", "serve", "--port", str(port), "--no-access-log"]
    process = subprocess.Popen(
        command,
        cwd=tree,
        env={**os.environ, **settings},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    stop_worker(process)
    raise SystemExit(f"embedq serve from {tree} did not start")


def big_header(process: Any, url: str) -> dict[str, float]:
    port = int(url.rsplit(":", 1)[1])
    before = rss_mb(process.pid)
    health: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=120) as client:
            while not done.is_set():
                started = time.monotonic()
                client.get(url + "/health")
                health.append(time.monotonic() - started)
                time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    peak = before
    started = time.monotonic()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        try:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer ")
            chunk = b"k" * MB
            while sent < 100 * MB:
                sock.sendall(chunk)
                sent += MB
                peak = max(peak, rss_mb(process.pid))
            sock.sendall(b"\r\n\r\n")
            sock.recv(1024)  # its answer, whenever it comes
        except OSError:
            pass  # refused and closed
    refused_s = time.monotonic() - started
    peak = max(peak, rss_mb(process.pid))
    done.set()
    prober.join()
    return {
        "refused_s": refused_s,
        "sent_mb": sent / MB,
        "rss_growth_mb": peak - before,
        "health_p50_ms": statistics.median(health) * 1000 if health else float("nan"),
    }


async def waiting_health(url: str, waiting: int) -> dict[str, float]:
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    limits = httpx.Limits(max_connections=waiting + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

        async def embed(number: int) -> float:
            started = time.monotonic()
            await client.post(
                "/v1/embeddings",
                headers=auth,
                json={"input": f"waits {number}", "model": "unserved"},
            )
            return time.monotonic() - started

        async def probe() -> list[float]:
            await asyncio.sleep(1)
            took = []
            for _ in range(60):
                started = time.monotonic()
                await client.get("/health")
                took.append(time.monotonic() - started)
                await asyncio.sleep(0.05)
            return took

        *answers, probes = await asyncio.gather(*(embed(n) for n in range(waiting)), probe())
    return {
        "health_p50_ms": statistics.median(probes) * 1000,
        "health_p99_ms": percentile(probes, 99) * 1000,
        "slowest_answer_s": max(answers),
    }


def one_key_against_another(url: str) -> dict[str, float]:
    heavy: dict[str, Any] = {}

    def send_heavy() -> None:
        started = time.monotonic()
        answer = httpx.post(
            url + "/v1/embeddings",
            headers={"Authorization": f"Bearer {KEYS[0]}"},
            json={"input": [f"text number {n}" for n in range(100_000)], "model": MODEL},
            timeout=600,
        )
        heavy.update(status=answer.status_code, seconds=time.monotonic() - started)

    thread = threading.Thread(target=send_heavy)
    thread.start()
    time.sleep(0.5)  # A's request is in
    started = time.monotonic()
    light = httpx.post(
        url + "/v1/embeddings",
        headers={"Authorization": f"Bearer {KEYS[1]}"},
        json={"input": "one short text", "model": MODEL},
        timeout=600,
    )
    light_s = time.monotonic() - started
    thread.join()
    return {
        "b_seconds": light_s,
        "b_status": light.status_code,
        "a_status": heavy["status"],
        "a_seconds": heavy["seconds"],
    }


def side(tree: Path, model_dir: Path, wait_s: float, work: Path) -> dict[str, Any]:
    from storage import schema
    from tasks import producer

    database_url = f"sqlite:///{work / 'embedq.db'}"
    schema.upgrade(database_url)
    redis.Redis.from_url(REDIS).flushdb()
    env = use_env(REDIS, database_url, model_dir)
    producer.register_model("hf://org/unserved", "unserved")  # known; no worker runs it
    process, url = start_serve(tree, env, wait_s)
    result: dict[str, Any] = {}
    try:
        result["big_header"] = big_header(process, url)
        result["waiting"] = asyncio.run(waiting_health(url, 200))
        worker = start_worker(env, log=work / "worker.log")
        try:
            time.sleep(5)  # the worker's model is loaded
            result["keys"] = one_key_against_another(url)
        finally:
            stop_worker(worker)
    finally:
        stop_worker(process)
        producer.dispose()
        redis.Redis.from_url(REDIS).flushdb()
    return result


def tree_at(ref: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(HERE), "archive", ref], check=True, capture_output=True
    ).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


ROWS = (
    ("100 MB header: refused after (s)", "big_header", "refused_s", "{:.2f}"),
    ("100 MB header: MiB the client got to send", "big_header", "sent_mb", "{:.0f}"),
    ("100 MB header: serve RSS growth (MiB)", "big_header", "rss_growth_mb", "{:.1f}"),
    ("100 MB header: /health p50 meanwhile (ms)", "big_header", "health_p50_ms", "{:.1f}"),
    ("200 waiting: /health p50 (ms)", "waiting", "health_p50_ms", "{:.1f}"),
    ("200 waiting: /health p99 (ms)", "waiting", "health_p99_ms", "{:.1f}"),
    ("200 waiting: slowest answer (s)", "waiting", "slowest_answer_s", "{:.1f}"),
    ("key B's one text beside A's 100,000 (s)", "keys", "b_seconds", "{:.2f}"),
    ("key B's status", "keys", "b_status", "{}"),
    ("key A's status", "keys", "a_status", "{}"),
)


def report(results: dict[str, dict[str, Any]], wait_s: float) -> str:
    names = list(results)
    lines = [
        f"bench/hostile.py on {hardware.cpu_model()}, {os.cpu_count()} CPUs;"
        f" wait timeout {wait_s:g}s; one run a side",
        "",
        f"{'':45}" + "".join(f"{name:>14}" for name in names),
    ]
    for label, group, key, shape in ROWS:
        values = [results[name][group][key] for name in names]
        cells = ["-" if value != value else shape.format(value) for value in values]  # nan
        lines.append(f"{label:45}" + "".join(f"{cell:>14}" for cell in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before-ref")
    parser.add_argument("--wait", type=float, default=10.0, help="EMBEDQ_API_WAIT_TIMEOUT")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = Settings(model_dir=args.model_dir, providers=["CPUExecutionProvider"])
    prepared(ModelStore(args.model_dir), MODEL, Precision.FP32, settings)
    work = Path(tempfile.mkdtemp(prefix="embedq-hostile-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        if args.before_ref:
            tree = tree_at(args.before_ref, work / "before-tree")
            (work / "before").mkdir()
            results[f"before {args.before_ref}"] = side(
                tree, args.model_dir, args.wait, work / "before"
            )
        (work / "after").mkdir()
        results["after"] = side(HERE, args.model_dir, args.wait, work / "after")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2) if args.json else report(results, args.wait))


if __name__ == "__main__":
    main()
