"""The pipeline's ceiling, stage by stage, with an engine that costs nothing.

A worker whose engine is free (``bench/free_engine.py``: precomputed unit vectors, real token
counts) shows what the pipeline around the engine can carry: on a GPU the engine is that cheap
next to SQL, the broker and Celery. For each store (SQLite, PostgreSQL) this prints:

- each stage alone, in this process, on the same texts: the producer's submit (job + ledger),
  the publish to Redis, the message decode a worker does (kombu envelope, JSON, the message
  model), the claim, tokenising (the real tokenizer, measured here once: the free engine reads
  the counts it made), the write of a finished batch (vectors, ledger end, statistics, job
  counts), the completion signal; texts/s and CPU microseconds per text, the CPU of this
  process plus that of the store's and the broker's server processes;
- the store's raw write limit for the same rows (PostgreSQL ``COPY ... FORMAT BINARY``, SQLite
  one ``executemany`` in one transaction) and the write stage's share of it;
- one job end to end (submit to ``succeeded``) through a real Celery worker with the free
  engine, in each worker mode (``prefork:1``: one process; ``prefork:N``: one per core;
  ``threads:16``: one process holding 16 batches, through the feeder where the code has one),
  with the CPU each side spent; the Celery share (broker, hand-off to the pool, acks) is the
  worker's CPU less its stages;
- on PostgreSQL, one-text jobs from 16 client threads, each submitting and waiting as an
  application does, in each worker mode: jobs/s and submit-to-done p50/p99;
- the real CPU engine's texts/s on the same texts, for scale.

With ``--before-ref REF`` the same measures run on the code of commit REF (this script and the
free engine copied into it) and then on this tree, taking turns, and are printed side by side.

    python bench/ceiling.py [--texts 200000] [--stage-texts 20000] [--stores sqlite,postgresql]
                            [--modes prefork:1,prefork:2,threads:16] [--one-text-jobs 3000]
                            [--clients 16] [--batch N] [--before-ref REF] [--repeats R] [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

import redis  # noqa: E402

from bench.free_engine import TOKENS_ENV, FreeEngine  # noqa: E402
from bench.pipeline import stop_worker  # noqa: E402

POSTGRESQL_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/embedq_ceiling"
BROKER_URL = "redis://127.0.0.1:6379/12"
MODEL = "minilm-fp32"
CORPUS = HERE.parent / "shared" / "corpus" / "pydocs.jsonl"
SCRATCH = "ceiling-scratch"
TICK = os.sysconf("SC_CLK_TCK")
TARGET_TEXTS_S = 20_000
TARGET_RAW_SHARE = 0.5


# --- texts ----------------------------------------------------------------------------------


def short_texts(corpus: Path, count: int) -> list[str]:
    """``count`` distinct short texts: the corpus lines of 40-160 characters, then again with
    a number after them, as many rounds as it takes."""
    with corpus.open(encoding="utf-8") as lines:
        base = [t for t in (json.loads(line) for line in lines) if 40 <= len(t) <= 160]
    texts = base[:count]
    round_ = 1
    while len(texts) < count:
        texts += [f"{t} ({round_})" for t in base[: count - len(texts)]]
        round_ += 1
    return texts


# --- CPU of processes -----------------------------------------------------------------------


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def pids_named(*names: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm in names:
                found.append(int(entry.name))
    return found


def tree_of(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


@dataclass
class Clock:
    """Wall time and CPU seconds of this process and of the service processes (by name: a
    server's backends come and go), over a span."""

    services: tuple[str, ...]

    def read(self) -> tuple[float, float, dict[int, float]]:
        return (
            time.perf_counter(),
            time.process_time(),
            {pid: _cpu_of(pid) for pid in pids_named(*self.services)},
        )

    @staticmethod
    def spent(start: dict[int, float], end: dict[int, float]) -> float:
        """CPU the service processes spent between two reads (one started since: all of its)."""
        return sum(cpu - start.get(pid, 0.0) for pid, cpu in end.items())


@dataclass
class Stage:
    name: str
    texts: int
    wall_s: float
    client_cpu_s: float
    service_cpu_s: float
    note: str = ""

    def row(self) -> dict[str, Any]:
        cpu = self.client_cpu_s + self.service_cpu_s
        return {
            "stage": self.name,
            "texts": self.texts,
            "texts_s": round(self.texts / self.wall_s) if self.wall_s else None,
            "cpu_us_per_text": round(cpu / self.texts * 1e6, 1),
            "client_us_per_text": round(self.client_cpu_s / self.texts * 1e6, 1),
            "service_us_per_text": round(self.service_cpu_s / self.texts * 1e6, 1),
            "note": self.note,
        }


@contextmanager
def timed(clock: Clock, name: str, texts: int, out: list[Stage], note: str = "") -> Iterator[None]:
    wall, cpu, service = clock.read()
    yield
    wall2, cpu2, service2 = clock.read()
    out.append(Stage(name, texts, wall2 - wall, cpu2 - cpu, Clock.spent(service, service2), note))


# --- the store ------------------------------------------------------------------------------


def fresh_postgresql(url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": target.database},
        )
        connection.execute(text(f'DROP DATABASE IF EXISTS "{target.database}"'))
        connection.execute(text(f'CREATE DATABASE "{target.database}"'))
    admin.dispose()


def database_for(store: str, work: Path) -> str:
    if store == "postgresql":
        fresh_postgresql(POSTGRESQL_URL)
        return POSTGRESQL_URL
    return f"sqlite:///{work / 'ceiling.db'}"


def use_settings(database_url: str, model_dir: Path, tokens: Path, batch: int | None) -> Any:
    from worker.settings import get_settings

    env = {
        "EMBEDQ_BROKER_URL": BROKER_URL,
        "EMBEDQ_DATABASE_URL": database_url,
        "EMBEDQ_MODEL_DIR": str(model_dir),
        "EMBEDQ_DEFAULT_MODEL": MODEL,
        "EMBEDQ_PROVIDERS": "CPUExecutionProvider",
        TOKENS_ENV: str(tokens),
    }
    if batch:
        env["EMBEDQ_JOB_BATCH_SIZE"] = str(batch)
    os.environ.update(env)
    get_settings.cache_clear()
    return get_settings()


class Discard:
    """A publisher that sends nothing: the submit stage alone."""

    def publish(self, messages: Any, queue: Any) -> None:
        pass


# --- stages ---------------------------------------------------------------------------------


def tokenizer_counts(
    texts: list[str], model_dir: Path, out: list[Stage], clock: Clock
) -> dict[str, int]:
    """Token counts by the model's real tokenizer (timed: the tokenise stage)."""
    from worker.engine import load_tokenizer

    tokenizer = load_tokenizer(model_dir / MODEL / "tokenizer.json", 256)
    counts: dict[str, int] = {}
    step = 128
    with timed(clock, "tokenise (real tokenizer, 128 a call)", len(texts), out):
        for start in range(0, len(texts), step):
            chunk = texts[start : start + step]
            for text, encoding in zip(chunk, tokenizer.encode_batch(chunk), strict=True):
                counts[text] = len(encoding.ids)
    return counts


def kombu_payloads(client: redis.Redis, queue: str) -> list[bytes]:
    payloads = client.lrange(queue, 0, -1)
    client.delete(queue)
    return list(payloads)


def decode(payload: bytes) -> Any:
    """What a worker does to a message before the task runs: the kombu envelope, the body,
    the message model."""
    from tasks.message import BatchMessage

    envelope = json.loads(payload)
    body = (
        base64.b64decode(envelope["body"])
        if envelope["properties"].get("body_encoding") == "base64"
        else envelope["body"]
    )
    args = json.loads(body)[0]
    return BatchMessage.model_validate(args[0])


def stages(texts: list[str], settings: Any, clock: Clock, engine: FreeEngine) -> list[Stage]:
    from storage import ledger
    from storage.session import scope, sessions_for
    from tasks import completion, producer
    from tasks.batches import embed_batch
    from tasks.message import BatchMessage
    from tasks.publishing import BrokerPublisher

    out: list[Stage] = []
    sessions = sessions_for(settings.database_url)
    n = len(texts)
    with timed(clock, "submit (job + ledger)", n, out):
        handle = producer.submit(texts, queue="bulk", settings=settings, publisher=Discard())
    plan = producer.plan_batches(texts, [str(i) for i in range(n)], settings.job_batch_size)
    messages = [BatchMessage.of(handle.id, MODEL, batch, time.time()) for batch in plan]
    client = redis.Redis.from_url(BROKER_URL)
    client.delete(SCRATCH)
    publisher = BrokerPublisher(settings)
    publisher.publish(messages[:1], SCRATCH)  # connect, outside the timing
    client.delete(SCRATCH)
    with timed(clock, "publish (to Redis)", n, out, f"{len(messages)} messages"):
        publisher.publish(messages, SCRATCH)
    payloads = kombu_payloads(client, SCRATCH)
    with timed(clock, "decode (envelope, JSON, message)", n, out):
        decoded = [decode(payload) for payload in payloads]
    assert len(decoded) == len(messages)
    with timed(clock, "claim (one transaction a batch)", n, out):
        for message in decoded:
            with scope(sessions) as session:
                ledger.claim(session, message.job_id, message.batch_index, "bench:1")
    with timed(clock, "engine (free)", n, out):
        for message in decoded:
            engine.encode(message.texts)
    with timed(clock, "write (vectors, ledger end, stats, job)", n, out):
        for message in decoded:
            with scope(sessions) as session:
                embed_batch(session, engine, message, provider=engine.provider)
    status = handle.status()
    if status["state"] != "succeeded":
        raise SystemExit(f"the stage job ended {status['state']}: {status}")
    calls = 500
    with timed(clock, "completion signal (per job)", calls, out, "per call, not per text"):
        for _ in range(calls):
            completion.signal(BROKER_URL, handle.id, status)
    client.close()
    return out


def raw_limit(texts: list[str], settings: Any, clock: Clock, engine: FreeEngine) -> Stage:
    """The same rows the write stage stores, written the fastest way the store has: COPY
    (binary) into PostgreSQL, one executemany in one transaction into SQLite."""
    import hashlib
    import uuid

    from storage import jobs
    from storage.models import Embedding, Job
    from storage.session import make_engine, scope, sessions_for

    url = settings.database_url
    job = str(uuid.uuid4())
    encoding = engine.encode(texts)
    rows = [
        (
            job,
            str(i),
            i,
            hashlib.sha256(t.encode()).hexdigest(),
            encoding.vectors.shape[1],
            encoding.vectors[i].tobytes(),
            encoding.token_counts[i],
            encoding.truncated[i],
        )
        for i, t in enumerate(texts)
    ]
    columns = "job_id, item_id, position, text_sha256, dim, vector, token_count, truncated"
    with scope(sessions_for(url)) as session:
        jobs.create_job(
            session,
            Job(id=job, model_name=MODEL, queue="bulk", total_items=len(texts), meta={}),
        )
    # The store's own engine: where sqlite-vec is installed, SQLite is opened through sqlean.py,
    # and two SQLite libraries on one file in one process break each other's POSIX locks.
    db = make_engine(url)
    table = Embedding.__tablename__
    if url.startswith("postgresql"):
        raw = db.raw_connection()
        try:
            cursor = raw.cursor()
            with timed(clock, "raw limit: COPY binary, one transaction", len(rows), out := []):
                with cursor.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(
                        ["text", "text", "int4", "text", "int4", "bytea", "int4", "bool"]
                    )
                    for row in rows:
                        copy.write_row(row)
                raw.commit()
        finally:
            raw.close()
    else:
        raw = db.raw_connection()
        try:
            cursor = raw.cursor()
            marks = ", ".join("?" * 8)
            with timed(clock, "raw limit: executemany, one transaction", len(rows), out := []):
                cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
                raw.commit()
        finally:
            raw.close()
    db.dispose()
    return out[0]


def real_engine(texts: list[str], model_dir: Path, clock: Clock) -> Stage:
    from worker.engine import Engine
    from worker.settings import get_settings

    engine = Engine.load(model_dir / MODEL, get_settings())
    engine.encode(texts[:64])
    out: list[Stage] = []
    with timed(clock, "real CPU engine (fp32, ONNX Runtime)", len(texts), out):
        for start in range(0, len(texts), 128):
            engine.encode(texts[start : start + 128])
    return out[0]


# --- end to end -----------------------------------------------------------------------------


def start_worker(mode: str, log: Path) -> subprocess.Popen[bytes]:
    """A free-engine worker in ``mode``: ``prefork:N`` (N pool processes, one batch each) or
    ``threads:N`` (one process, N threads; ``EMBEDQ_IN_FLIGHT=N``, which routes the batches
    through the feeder on code that has one and is ignored by code that has not)."""
    pool, count = mode.split(":")
    command = [sys.executable, "-m", "celery", "-A", "bench.free_engine", "worker", "-P", pool]
    command += ["-c", count, "-Q", "interactive,bulk", "-n", "ceiling@%h"]
    command += ["--without-gossip", "--without-mingle", "-l", "WARNING"]
    env = {**os.environ, "EMBEDQ_IN_FLIGHT": count if pool == "threads" else "1"}
    with log.open("ab") as out:
        return subprocess.Popen(
            command, cwd=os.getcwd(), env=env, stdout=out, stderr=out, start_new_session=True
        )


def wait_ready(settings: Any) -> None:
    """Until the worker answers a ping and has its pool up (one-text jobs come back)."""
    from tasks import producer

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            for _ in range(4):
                producer.submit(["warm up"], settings=settings).wait(timeout=30)
            return
        except Exception:
            time.sleep(0.5)
    raise SystemExit("the free-engine worker did not come up in 120 s")


@contextmanager
def running_worker(mode: str, settings: Any, work: Path) -> Iterator[list[int]]:
    """A free-engine worker in ``mode``, ready; yields its processes."""
    client = redis.Redis.from_url(BROKER_URL)
    client.flushdb()
    worker = start_worker(mode, work / "worker.log")
    try:
        wait_ready(settings)
        yield tree_of(worker.pid)
    finally:
        stop_worker(worker)
        client.close()


def end_to_end(
    texts: list[str], settings: Any, mode: str, services: tuple[str, ...], work: Path
) -> dict[str, Any]:
    """One job of ``texts`` on the bulk queue, from submit to its end."""
    from tasks import producer

    with running_worker(mode, settings, work) as worker_pids:
        clock = Clock(services)
        w0 = sum(_cpu_of(pid) for pid in worker_pids)
        wall, cpu, service = clock.read()
        handle = producer.submit(texts, queue="bulk", settings=settings)
        submitted = time.perf_counter()
        status = handle.wait(timeout=1800)
        wall2, cpu2, service2 = clock.read()
        w1 = sum(_cpu_of(pid) for pid in worker_pids)
    n = len(texts)
    return {
        "mode": mode,
        "texts": n,
        "state": status["state"],
        "seconds": round(wall2 - wall, 2),
        "texts_s": round(n / (wall2 - wall)),
        "submit_s": round(submitted - wall, 2),
        "cpu_us_per_text": {
            "producer": round((cpu2 - cpu) / n * 1e6, 1),
            "worker": round((w1 - w0) / n * 1e6, 1),
            "services": round(Clock.spent(service, service2) / n * 1e6, 1),
        },
    }


def one_text_jobs(
    texts: list[str],
    settings: Any,
    mode: str,
    clients: int,
    services: tuple[str, ...],
    work: Path,
    waiting: bool = True,
) -> dict[str, Any]:
    """``len(texts)`` one-text jobs from ``clients`` threads: jobs/s until every job is
    terminal, and submit-to-done percentiles. ``waiting``: each thread waits for its job before
    the next, as an interactive application does; otherwise the threads submit as fast as they
    can and the jobs' ends are read from the store (``finished_at``), as an application sending
    single texts in bulk does (the issue's 8 threads and its 212 s p50 were of this kind)."""
    import threading
    import uuid
    from datetime import UTC

    import numpy as np
    from sqlalchemy import func, select

    from storage.models import Job
    from storage.session import scope, sessions_for
    from tasks import producer

    times: list[float] = []
    states: list[str] = []
    lock = threading.Lock()
    next_text = iter(texts)
    tag = f"one-text-{uuid.uuid4().hex[:8]}"
    sent: dict[str, float] = {}

    def client() -> None:
        while True:
            with lock:
                text = next(next_text, None)
            if text is None:
                return
            started = time.perf_counter()
            handle = producer.submit([text], settings=settings, tag=tag)
            if not waiting:
                with lock:
                    sent[handle.id] = time.time()
                continue
            state = handle.wait(timeout=300)["state"]
            with lock:
                times.append((time.perf_counter() - started) * 1000)
                states.append(state)

    finished = (Job.tag == tag) & Job.finished_at.is_not(None)

    def ended() -> int:
        with scope(sessions_for(settings.database_url)) as session:
            return int(session.scalar(select(func.count()).select_from(Job).where(finished)) or 0)

    with running_worker(mode, settings, work) as worker_pids:
        clock = Clock(services)
        w0 = sum(_cpu_of(pid) for pid in worker_pids)
        started, cpu, service = clock.read()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if not waiting:  # until every job is terminal, counting them in the store every 20 ms
            deadline = time.monotonic() + 600
            while ended() < len(texts) and time.monotonic() < deadline:
                time.sleep(0.02)
        ended_at, cpu2, service2 = clock.read()
        if not waiting:  # each job's submit-to-done, read once all are done (not timed)
            with scope(sessions_for(settings.database_url)) as session:
                query = select(Job.id, Job.state, Job.finished_at).where(finished)
                rows = session.execute(query).all()
            for row in rows:
                done = row.finished_at
                done = done if done.tzinfo else done.replace(tzinfo=UTC)
                times.append((done.timestamp() - sent[row.id]) * 1000)
                states.append(str(row.state))
        w1 = sum(_cpu_of(pid) for pid in worker_pids)
        seconds = ended_at - started
    n = len(texts)
    return {
        "mode": mode,
        "waiting": waiting,
        "jobs": len(texts),
        "clients": clients,
        "jobs_s": round(len(texts) / seconds, 1),
        "p50_ms": round(float(np.percentile(times, 50)), 1),
        "p99_ms": round(float(np.percentile(times, 99)), 1),
        "succeeded": states.count("succeeded"),
        "cpu_us_per_job": {
            "clients": round((cpu2 - cpu) / n * 1e6),
            "worker": round((w1 - w0) / n * 1e6),
            "services": round(Clock.spent(service, service2) / n * 1e6),
        },
    }


# --- one side -------------------------------------------------------------------------------


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    from bench.engine import prepared
    from storage import schema
    from worker.manifest import Precision
    from worker.model_store import ModelStore
    from worker.settings import Settings

    model_dir = Path(args.model_dir)
    prepared(ModelStore(model_dir), MODEL, Precision.FP32, Settings(model_dir=model_dir))
    work = Path(tempfile.mkdtemp(prefix="embedq-ceiling-"))
    texts = short_texts(Path(args.corpus), args.texts)
    stage_texts = texts[: args.stage_texts]
    results: dict[str, Any] = {"stores": {}}
    count_clock = Clock(())
    counted: list[Stage] = []
    tokens = tokenizer_counts(texts, model_dir, counted, count_clock)
    table = work / "tokens.json"
    table.write_text(json.dumps(tokens))
    results["tokenise"] = counted[0].row()
    engine = FreeEngine(tokens)
    for store in args.stores:
        url = database_for(store, work)
        settings = use_settings(url, model_dir, table, args.batch)
        schema.upgrade(url)
        services = ("redis-server", "postgres") if store == "postgresql" else ("redis-server",)
        clock = Clock(services)
        measured = stages(stage_texts, settings, clock, engine)
        limit = raw_limit(stage_texts, settings, clock, engine)
        write = next(s for s in measured if s.name.startswith("write"))
        side: dict[str, Any] = {
            "stages": [s.row() for s in measured],
            "raw_limit": limit.row(),
            "write_share_of_raw": round((limit.wall_s / write.wall_s), 3),
            "end_to_end": [end_to_end(texts, settings, m, services, work) for m in args.modes],
            "one_text_jobs": [
                one_text_jobs(
                    texts[: args.one_text_jobs], settings, m, args.clients, services, work, wait
                )
                for wait in (True, False)
                for m in args.modes
                if args.one_text_jobs and store == "postgresql"
            ],
        }
        results["stores"][store] = side
        from storage.session import dispose_all

        dispose_all()
    results["real_engine"] = real_engine(stage_texts[:1024], model_dir, Clock(())).row()
    shutil.rmtree(work, ignore_errors=True)
    return results


# --- before and after -----------------------------------------------------------------------


def tree_at(ref: str, into: Path) -> Path:
    """The code of commit ``ref`` in ``into``, with this script and the free engine in it."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(HERE), "archive", ref], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for name in ("ceiling.py", "free_engine.py"):
        shutil.copy(HERE / "bench" / name, into / "bench" / name)
    return into


def run_child(tree: Path, args: argparse.Namespace, label: str, log: Path) -> dict[str, Any]:
    command = [sys.executable, "bench/ceiling.py", "--json", "--child"]
    command += ["--texts", str(args.texts), "--stage-texts", str(args.stage_texts)]
    command += ["--stores", ",".join(args.stores), "--model-dir", str(args.model_dir)]
    command += ["--modes", ",".join(args.modes), "--corpus", str(args.corpus)]
    command += ["--one-text-jobs", str(args.one_text_jobs), "--clients", str(args.clients)]
    if args.batch:
        command += ["--batch", str(args.batch)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with log.open("a") as err:
        done = subprocess.run(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=err)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{label}: bench/ceiling.py exited {done.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu if ln.startswith("Model name")), "?")
    return f"{model}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"


def median_side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the runs of one side (the first run's shape)."""

    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            return {k: merge([v[k] for v in values]) for k in first}
        if isinstance(first, list):
            return [merge([v[i] for v in values]) for i in range(len(first))]
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            return round(statistics.median(values), 3)
        return first

    return merge(runs)  # type: ignore[no-any-return]


def report(sides: dict[str, dict[str, Any]], header: str) -> str:
    names = list(sides)
    lines = [header, ""]
    first = sides[names[0]]
    tok = [sides[n]["tokenise"] for n in names]
    lines.append(
        "tokenise (real tokenizer): "
        + "; ".join(
            f"{n} {t['texts_s']:,} texts/s, {t['cpu_us_per_text']} us/text"
            for n, t in zip(names, tok, strict=True)
        )
    )
    real = [sides[n]["real_engine"] for n in names]
    lines.append(
        "real CPU engine: "
        + "; ".join(f"{n} {r['texts_s']:,} texts/s" for n, r in zip(names, real, strict=True))
    )
    for store in first["stores"]:
        lines += ["", f"== {store} =="]
        head = f"{'stage':44}" + "".join(f"{n + ' texts/s':>16}{'us/text':>9}" for n in names)
        lines.append(head)
        stage_names = [s["stage"] for s in first["stores"][store]["stages"]]
        for name in [*stage_names, "raw"]:
            cells = ""
            label = name
            for n in names:
                side = sides[n]["stores"][store]
                row = (
                    side["raw_limit"]
                    if name == "raw"
                    else next(s for s in side["stages"] if s["stage"] == name)
                )
                label = row["stage"]
                cells += f"{row['texts_s'] or 0:>16,}{row['cpu_us_per_text']:>9}"
            lines.append(f"{label[:44]:44}{cells}")
        lines.append(
            "write stage / raw limit: "
            + ", ".join(f"{n} {sides[n]['stores'][store]['write_share_of_raw']:.0%}" for n in names)
        )
        for i, e2e in enumerate(first["stores"][store]["end_to_end"]):
            cells = []
            for n in names:
                run = sides[n]["stores"][store]["end_to_end"][i]
                cpu = run["cpu_us_per_text"]
                cells.append(
                    f"{n} {run['texts_s']:,} texts/s ({run['seconds']} s, {run['state']};"
                    f" CPU us/text producer {cpu['producer']}, worker {cpu['worker']},"
                    f" services {cpu['services']})"
                )
            lines.append(
                f"end to end, {e2e['texts']:,} texts, worker {e2e['mode']}: " + "; ".join(cells)
            )
            last = sides[names[-1]]["stores"][store]["end_to_end"][i]
            verdict = "PASS" if last["texts_s"] >= TARGET_TEXTS_S else "MISS"
            lines.append(f"  target >= {TARGET_TEXTS_S:,} texts/s ({names[-1]}): {verdict}")
        for i, jobs in enumerate(first["stores"][store].get("one_text_jobs", [])):
            cells = []
            for n in names:
                run = sides[n]["stores"][store]["one_text_jobs"][i]
                cells.append(
                    f"{n} {run['jobs_s']:,} jobs/s (p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms,"
                    f" {run['succeeded']} of {run['jobs']} succeeded; CPU us/job"
                    + " clients {clients}, worker {worker}, services {services})".format(
                        **run["cpu_us_per_job"]
                    )
                )
            how = "each waiting for its job" if jobs["waiting"] else "submitting without waiting"
            lines.append(
                f"one-text jobs, {jobs['clients']} client threads {how}, worker {jobs['mode']}: "
                + "; ".join(cells)
            )
            last = sides[names[-1]]["stores"][store]["one_text_jobs"][i]
            verdict = "PASS" if last["jobs_s"] >= 1000 else "MISS"
            lines.append(f"  target >= 1,000 jobs/s ({names[-1]}): {verdict}")
        share = sides[names[-1]]["stores"][store]
        if not share["end_to_end"]:
            continue
        e2e_best = max(r["texts_s"] for r in share["end_to_end"])
        raw = share["raw_limit"]["texts_s"]
        verdict = "PASS" if e2e_best >= TARGET_RAW_SHARE * raw else "MISS"
        lines.append(
            f"  end to end / raw write limit ({names[-1]}): {e2e_best / raw:.0%}"
            f" (target >= {TARGET_RAW_SHARE:.0%}): {verdict}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=200_000)
    parser.add_argument("--stage-texts", type=int, default=20_000)
    parser.add_argument("--stores", type=lambda s: s.split(","), default=["sqlite", "postgresql"])
    parser.add_argument(
        "--modes",
        type=lambda s: [m for m in s.split(",") if m],
        default=["prefork:1", f"prefork:{os.cpu_count() or 1}", "threads:16"],
        help="worker modes for the end-to-end runs: prefork:N, threads:N (comma-separated)",
    )
    parser.add_argument("--one-text-jobs", type=int, default=3000, help="0: none")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--batch", type=int, default=0, help="EMBEDQ_JOB_BATCH_SIZE (default: the settings')"
    )
    parser.add_argument("--before-ref", default="")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model-dir", default=str(Path.home() / ".cache/embedq/bench-models"))
    parser.add_argument("--corpus", default=os.environ.get("EMBEDQ_CORPUS", str(CORPUS)))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_side(args)))
        return
    header = f"bench/ceiling.py on {machine()}"
    with tempfile.TemporaryDirectory(prefix="embedq-ceiling-") as tmp:
        trees = {"now": HERE}
        if args.before_ref:
            sha = subprocess.run(
                ["git", "-C", str(HERE), "rev-parse", "--short", args.before_ref],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            trees = {f"before {sha}": tree_at(sha, Path(tmp) / "before"), "now": HERE}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        log = Path(tmp) / "children.log"
        for repeat in range(args.repeats):
            for name, tree in trees.items():
                started = time.perf_counter()
                runs[name].append(run_child(tree, args, name, log))
                print(
                    f"{name} run {repeat + 1}: {time.perf_counter() - started:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
        sides = {name: median_side(r) for name, r in runs.items()}
    if args.json:
        print(json.dumps({"machine": header, "sides": sides, "runs": runs}, indent=1))
    else:
        print(report(sides, header + f"; medians of {args.repeats} run(s) a side"))


if __name__ == "__main__":
    main()
