"""The job pipeline against the bare engine, in one run: producer -> Redis -> a real Celery
worker process -> the SQL store, on the same texts and the same model, CPU threads alike.

Throughput: each repeat embeds the texts once with the engine in this process (the worker idles)
and once as one job through the pipeline (this process only waits); the two take turns so noise
on a shared machine hits them alike, and medians are compared. Round trip: one-text jobs one
after another, each timed from ``submit`` until its vector is readable from the store, on each
store in turn (SQLite, then PostgreSQL), with where each millisecond went: the worker runs with
a probe (``probed_app`` below: timestamps at each stage, nothing else changed) and this process
times its own side. Blocks of bare ``Engine.encode([text])`` calls on the same texts take turns
with blocks of round trips, so "inference in the worker" can be compared with "the engine alone".

    python bench/pipeline.py [--texts N] [--repeats R] [--round-trips K]
                             [--stores sqlite,postgresql] [--postgresql-url URL]
                             [--database-url URL] [--broker-url URL] [--pool POOL] [--json]
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
POSTGRESQL_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/embedq_bench"
PROBE_ENV = "EMBEDQ_BENCH_PROBE"  # folder the probed worker writes its timestamps to
SPIN_ENV = "EMBEDQ_BENCH_ORT_SPINNING"  # "0": the probed worker's runtime threads never spin
WARM_UP = 20  # round trips run and not counted (connections, caches, the first statements)
BLOCK = 25  # round trips (and bare engine calls) per turn


def use_env(broker_url: str, database_url: str, model_dir: Path) -> dict[str, str]:
    """The settings shared by the benchmark and its workers, set in this process too."""
    env = {
        "EMBEDQ_BROKER_URL": broker_url,
        "EMBEDQ_DATABASE_URL": database_url,
        "EMBEDQ_MODEL_DIR": str(model_dir),
        "EMBEDQ_DEFAULT_MODEL": MODEL,
        "EMBEDQ_PROVIDERS": "CPUExecutionProvider",
    }
    os.environ.update(env)
    get_settings.cache_clear()
    return env


def start_worker(
    env: dict[str, str],
    queues: str = "interactive,bulk",
    app: str = "worker",
    pool: str = "",
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """A real worker, as an operator would start one on this machine: prefork, one process;
    its output goes to ``log`` when given."""
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "-c", "1"]
    command += ["-Q", queues, "-n", f"{queues.replace(',', '-')}@%h"]
    command += ["--without-gossip", "--without-mingle", "-l", "WARNING"]
    if pool:
        command += ["-P", pool]
    if log is None:
        return subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command, env={**os.environ, **env}, stdout=out, stderr=out, start_new_session=True
        )


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


# --- the probe ------------------------------------------------------------------------------
# Epoch timestamps (time.time(): one clock for every process on this machine) taken around the
# functions the round trip passes through, by wrapping them; each wrap costs about a
# microsecond. The worker's records go to one file per process, written after the completion
# signal (the pool child) or buffered until exit (the parent, whose write would sit in the
# hand-off), and are joined with this process's own by task id.


@dataclass
class Marks:
    """Timestamps of one process, by task id, then by mark name."""

    by_task: dict[str, dict[str, float]] = field(default_factory=dict)
    current: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.current.setdefault(name, time.time())


def _timed(marks: Marks, before: str, after: str, call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    def timed(*args: Any, **kwargs: Any) -> Any:
        marks.mark(before)
        try:
            return call(*args, **kwargs)
        finally:
            marks.mark(after)

    return timed


def install_worker_probe(folder: Path) -> None:
    """Wrap the worker's stages (in the parent before it forks, so pool children inherit it)."""
    from celery.signals import task_postrun, task_prerun, task_received

    from storage import ledger
    from tasks import batches, completion
    from worker import engine

    parent = Marks()
    child = Marks()
    out: dict[str, Any] = {}

    def received(request: Any, **_: Any) -> None:
        parent.by_task[request.id] = {"received": time.time()}

    def prerun(task_id: str, **_: Any) -> None:
        child.current = {"prerun": time.time()}

    def postrun(task_id: str, **_: Any) -> None:
        child.current["postrun"] = time.time()
        if "file" not in out:
            out["file"] = (folder / f"child-{os.getpid()}.jsonl").open("a")
        out["file"].write(json.dumps({"task": task_id, **child.current}) + "\n")
        out["file"].flush()

    def flush_parent() -> None:
        if parent.by_task:
            with (folder / f"parent-{os.getpid()}.jsonl").open("a") as handle:
                for task, stamps in parent.by_task.items():
                    handle.write(json.dumps({"task": task, **stamps}) + "\n")
            parent.by_task.clear()

    task_received.connect(received, weak=False)
    task_prerun.connect(prerun, weak=False)
    task_postrun.connect(postrun, weak=False)
    atexit.register(flush_parent)
    batches.run_message = _timed(child, "run", "run_end", batches.run_message)
    ledger.claim = _timed(child, "claim", "claim_end", ledger.claim)
    batches.embed_batch = _timed(child, "batch", "batch_end", batches.embed_batch)
    engine.Engine.encode = _timed(child, "encode", "encode_end", engine.Engine.encode)
    completion.signal = _timed(child, "signal", "signal_end", completion.signal)
    if os.environ.get(SPIN_ENV) == "0":
        _no_spinning()


def _no_spinning() -> None:
    """``--ort-spinning off``: the runtime's idle threads sleep at once (as on a worker of
    several processes), for comparison; the worker's engine is built with them spinning."""
    import importlib

    for name in ("worker.runtimes", "worker.engine"):  # where it lives now, where it did
        try:
            module: Any = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "session_options"):
            build = module.session_options

            def options(settings: Any, build: Any = build) -> Any:
                built = build(settings)
                built.add_session_config_entry("session.intra_op.allow_spinning", "0")
                return built

            module.session_options = options
            return
    raise SystemExit("--ort-spinning off: no session_options to wrap")


def __getattr__(name: str) -> Any:
    """``celery -A bench.pipeline:probed_app worker``: embedq's app with the probe installed."""
    if name != "probed_app":
        raise AttributeError(name)
    from worker.app import app

    install_worker_probe(Path(os.environ[PROBE_ENV]))
    return app


@contextmanager
def client_probe(marks: Marks) -> Iterator[None]:
    """Time this process's side: submit's SQL, each message kombu publishes, the wait."""
    from kombu.messaging import Producer

    from tasks.publishing import BrokerPublisher

    publish, kombu_publish = BrokerPublisher.publish, Producer.publish

    def kombu_timed(self: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        exchange = str(kwargs.get("exchange") or getattr(self.exchange, "name", ""))
        event = exchange == "celeryev"
        marks.mark("event" if event else "send")
        try:
            return kombu_publish(self, body, *args, **kwargs)
        finally:
            marks.mark("event_end" if event else "send_end")

    BrokerPublisher.publish = _timed(marks, "publish", "publish_end", publish)  # type: ignore[method-assign]
    Producer.publish = kombu_timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        BrokerPublisher.publish = publish  # type: ignore[method-assign]
        Producer.publish = kombu_publish  # type: ignore[method-assign]


# Each stage: (label, from mark, to mark). Client marks: submit, publish, send, send_end, event,
# event_end, publish_end, submitted, waited, read. Parent: received. Child: prerun, run, claim,
# claim_end, batch, encode, encode_end, batch_end, run_end, signal, signal_end, postrun.
STAGES = [
    ("submit: job + ledger rows, commit", "submit", "publish"),
    ("publish: message + task-sent event", "publish", "publish_end"),
    ("(of which the task-sent event)", "event", "event_end"),
    ("broker -> worker parent", "publish_end", "received"),
    ("prefork hand-off -> task starts", "received", "run"),
    ("parse, engine lookup", "run", "claim"),
    ("claim (SQL)", "claim", "claim_end"),
    ("claim commit", "claim_end", "batch"),
    ("engine (in the worker)", "encode", "encode_end"),
    ("SQL write", "encode_end", "batch_end"),
    ("commit", "batch_end", "run_end"),
    ("to the completion signal", "run_end", "signal"),
    ("signal -> waiter wakes, reads the job", "signal", "waited"),
    ("read back the vector", "waited", "read"),
]


def read_worker_marks(folder: Path) -> dict[str, dict[str, float]]:
    marks: dict[str, dict[str, float]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            marks.setdefault(record.pop("task"), {}).update(record)
    return marks


def breakdown(
    client: dict[str, dict[str, float]], worker: dict[str, dict[str, float]]
) -> dict[str, float]:
    """Median milliseconds of each stage over the jobs both sides recorded."""
    stages: dict[str, list[float]] = {label: [] for label, _, _ in STAGES}
    for task, mine in client.items():
        stamps = {**worker.get(task, {}), **mine}
        for label, start, end in STAGES:
            if start in stamps and end in stamps:
                stages[label].append((stamps[end] - stamps[start]) * 1000)
    return {k: round(statistics.median(v), 2) for k, v in stages.items() if v}


# --- setup and runs -------------------------------------------------------------------------


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


def fresh_postgresql(url: str) -> None:
    """Create the benchmark's database when missing, and empty it."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        found = connection.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": target.database}
        ).first()
        if found is None:
            connection.execute(text(f'CREATE DATABASE "{target.database}"'))
    admin.dispose()
    engine = create_engine(target, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


def prepare(args: argparse.Namespace, database_url: str | None = None) -> Bench:
    texts = load_texts(args.corpus, args.texts)
    store = ModelStore(args.model_dir)
    folder = prepared(store, MODEL, Precision.FP32, Settings(model_dir=args.model_dir))
    work = Path(tempfile.mkdtemp(prefix="embedq-bench-"))
    database_url = database_url or args.database_url or f"sqlite:///{work / 'bench.db'}"
    if database_url.startswith("postgresql"):
        fresh_postgresql(database_url)
    env = use_env(args.broker_url, database_url, args.model_dir)
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


def throughput(bench: Bench, repeats: int) -> dict[str, Any]:
    """Texts/s of the bare engine and of one job through the pipeline, taking turns."""
    from tasks import producer

    texts = bench.texts
    engine_s, pipeline_s = [], []
    for _ in range(repeats):
        engine_s.append(engine_seconds(bench))
        time.sleep(0.2)  # let this process's spinning runtime threads go to sleep
        started = time.perf_counter()
        job = producer.submit(texts, queue="bulk")
        status = job.wait(timeout=1800)
        pipeline_s.append(time.perf_counter() - started)
        if status["state"] != "succeeded" or status["done"] != len(texts):
            raise SystemExit(f"pipeline job did not succeed: {status}")
    engine_rate = len(texts) / statistics.median(engine_s)
    pipeline_rate = len(texts) / statistics.median(pipeline_s)
    return {
        "engine_texts_per_s": round(engine_rate, 1),
        "pipeline_texts_per_s": round(pipeline_rate, 1),
        "pipeline_share": round(pipeline_rate / engine_rate, 3),
    }


def round_trips(bench: Bench, count: int, probe: Path) -> dict[str, Any]:
    """``count`` one-text jobs one after another, blocks of bare engine calls between."""
    from tasks import producer
    from tasks.message import task_id

    texts, engine = bench.texts, bench.engine
    trips, submits, alone, job_ids = [], [], [], []
    client: dict[str, dict[str, float]] = {}
    marks = Marks()
    with client_probe(marks):
        for i in range(count + WARM_UP):
            if i % BLOCK == 0:
                for j in range(i, i + BLOCK):
                    started = time.perf_counter()
                    engine.encode([texts[j % len(texts)]])
                    alone.append((time.perf_counter() - started) * 1000)
                time.sleep(0.2)  # as above: the worker gets the cores to itself again
            text = texts[i % len(texts)]
            marks.current = {}
            marks.mark("submit")
            started = time.perf_counter()
            job = producer.submit([text])
            submitted = time.perf_counter()
            marks.mark("submitted")
            job.wait(timeout=60)
            marks.mark("waited")
            _, vectors = job.embeddings()
            done = time.perf_counter()
            marks.mark("read")
            if vectors.shape != (1, engine.dim):
                raise SystemExit(f"round trip {i} read back {vectors.shape}")
            if i >= WARM_UP:
                trips.append((done - started) * 1000)
                submits.append((submitted - started) * 1000)
                job_ids.append(job.id)
                client[task_id(job.id, 0)] = marks.current
    time.sleep(0.5)  # the child writes its marks after the signal
    return {
        "trips": trips,
        "submits": submits,
        "alone": alone,
        "job_ids": job_ids,
        "client": client,
    }


def run_store(args: argparse.Namespace, database_url: str | None) -> dict[str, Any]:
    bench = prepare(args, database_url)
    texts, env, settings, engine = bench.texts, bench.env, bench.settings, bench.engine
    probe = bench.work / "probe"
    probe.mkdir()

    from tasks import producer

    app = "bench.pipeline:probed_app" if args.probe else "worker"
    spinning = "1" if args.ort_spinning == "on" else "0"
    worker = start_worker(
        {**env, PROBE_ENV: str(probe), SPIN_ENV: spinning}, app=app, pool=args.pool
    )
    try:
        # Warm both: the worker's child loads the model at start; this waits for it.
        producer.submit(texts[:64]).wait(timeout=300)
        engine.encode(texts[:64])
        result = throughput(bench, args.repeats) if args.repeats else {}
        trips = round_trips(bench, args.round_trips, probe)
        stages = stage_medians(bench.database_url, trips["job_ids"])
    finally:
        stop_worker(worker)
        producer.dispose()
    worker_marks = read_worker_marks(probe)
    times = trips["trips"]
    return {
        "texts": len(texts),
        "repeats": args.repeats,
        "database": bench.database_url.split(":", 1)[0].split("+")[0],
        "pool": args.pool or "prefork",
        "ort_spinning": args.ort_spinning,
        "job_batch_size": settings.job_batch_size,
        "threads": settings.threads(),
        **result,
        "round_trips": len(times),
        "round_trip_p50_ms": round(percentile(times, 50), 2),
        "round_trip_p99_ms": round(percentile(times, 99), 2),
        "round_trip_max_ms": round(max(times), 2),
        "round_trip_submit_ms": round(statistics.median(trips["submits"]), 2),
        "round_trip_worker_ms": stages,
        "round_trip_stages_ms": breakdown(trips["client"], worker_marks),
        "engine_alone_ms": round(statistics.median(trips["alone"]), 2),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.database_url:
        urls: list[str | None] = [args.database_url]
    else:
        chosen = {"sqlite": None, "postgresql": args.postgresql_url}
        urls = [chosen[name.strip()] for name in args.stores.split(",") if name.strip()]
    return [run_store(args, url) for url in urls]


def report(results: list[dict[str, Any]]) -> str:
    first = results[0]
    lines = [
        f"{first['texts']} corpus texts, {first['job_batch_size']} per batch,"
        f" {first['threads']} ONNX threads each (spinning {first['ort_spinning']}),"
        f" {first['pool']} worker with one process;"
        f" round trips: {first['round_trips']} one-text jobs per store after {WARM_UP} warm-up",
        "",
    ]
    if first.get("pipeline_share") is not None:
        lines.append(f"throughput, median of {first['repeats']} interleaved repeats:")
        lines.append("  store         engine texts/s  pipeline texts/s  share (target >=0.85)")
        for r in results:
            lines.append(
                f"  {r['database']:<12}  {r['engine_texts_per_s']:14.1f}"
                f"  {r['pipeline_texts_per_s']:16.1f}  {r['pipeline_share']:.3f}"
                f" {'PASS' if r['pipeline_share'] >= TARGET_SHARE else 'FAIL'}"
            )
        lines.append("")
    width = max(len(label) for label, _, _ in STAGES) + 2
    lines.append(
        "one-text round trip, ms".ljust(width) + "".join(f"{r['database']:>12}" for r in results)
    )
    rows = [
        ("p50 (target <=25)", "round_trip_p50_ms"),
        ("p99", "round_trip_p99_ms"),
        ("max", "round_trip_max_ms"),
    ]
    for label, key in rows:
        lines.append(f"  {label}".ljust(width) + "".join(f"{r[key]:12.2f}" for r in results))
    lines.append("stage medians:")
    for label, _, _ in STAGES:
        cells = "".join(
            f"{r['round_trip_stages_ms'].get(label, float('nan')):12.2f}" for r in results
        )
        lines.append(f"  {label}".ljust(width) + cells)
    lines.append(
        "  sum of the stages (one path)".ljust(width)
        + "".join(f"{_path_sum(r):12.2f}" for r in results)
    )
    lines.append(
        "  engine alone, this process".ljust(width)
        + "".join(f"{r['engine_alone_ms']:12.2f}" for r in results)
    )
    lines.append(
        "  load (1 min) at the end".ljust(width)
        + "".join(f"{r['load_1min']:12.2f}" for r in results)
    )
    return "\n".join(lines)


def _path_sum(result: dict[str, Any]) -> float:
    """The stages on the round trip's path (the rows in brackets are parts of another)."""
    stages = result["round_trip_stages_ms"]
    return sum(v for k, v in stages.items() if not k.startswith("("))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="0: round trips only")
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--postgresql-url", default=POSTGRESQL_URL)
    parser.add_argument("--database-url", help="one store only (overrides --stores)")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--pool", default="", help="the worker's -P (default: prefork)")
    parser.add_argument("--no-probe", dest="probe", action="store_false")
    parser.add_argument(
        "--ort-spinning", choices=("on", "off"), default="on", help="the probed worker's"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args)
    if args.json:  # the first store's figures at the top (bench/ledger.py reads them)
        print(json.dumps({**results[0], "stores": results}, indent=2))
    else:
        print(report(results))


if __name__ == "__main__":
    main()
