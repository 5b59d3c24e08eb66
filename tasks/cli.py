"""The ``embedq`` command line.

Commands import the heavy parts (onnxruntime, tokenizers, torch) inside their bodies, so
``embedq --help`` stays fast and a producer-only install can use the queue commands.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from worker.errors import EmbedqError
from worker.manifest import Pooling, Precision
from worker.settings import get_settings

app = typer.Typer(help="Text embeddings as background jobs.", no_args_is_help=True)
models_app = typer.Typer(
    help="Prepare and inspect models in the model store.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
db_app = typer.Typer(help="Create and migrate the job store's schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    from worker.logs import use_json

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    use_json()


def _fail(exc: EmbedqError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=2)


def _store() -> Any:
    from worker.model_store import ModelStore

    return ModelStore(get_settings().model_dir)


Source = Annotated[str, typer.Argument(help="hf://ORG/NAME[@REV], a URL, or a folder")]
Name = Annotated[str, typer.Option("--name", help="name to install the model under")]
Quantize = Annotated[str | None, typer.Option(help="int8: dynamic int8 for CPUs")]
Fp16 = Annotated[bool, typer.Option("--fp16", help="half precision, for GPUs")]
Sha256 = Annotated[str | None, typer.Option(help="expected sha256 of a URL download")]
MaxSeqLength = Annotated[int | None, typer.Option(help="override the model's")]
PoolingOption = Annotated[Pooling | None, typer.Option(help="override the model's")]
Normalize = Annotated[
    bool | None, typer.Option("--normalize/--no-normalize", help="override the model's")
]


def _options(
    quantize: str | None,
    fp16: bool,
    sha256: str | None,
    max_seq_length: int | None,
    pooling: Pooling | None,
    normalize: bool | None,
) -> dict[str, Any]:
    """The pull options as the catalog stores them (JSON), checked."""
    if quantize not in (None, "int8"):
        raise typer.BadParameter("only int8 is supported", param_hint="--quantize")
    if quantize and fp16:
        raise typer.BadParameter("choose one of --quantize int8 and --fp16")
    precision = Precision.INT8 if quantize else Precision.FP16 if fp16 else Precision.FP32
    options = {
        "precision": str(precision),
        "sha256": sha256,
        "max_seq_length": max_seq_length,
        "pooling": None if pooling is None else str(pooling),
        "normalize": normalize,
    }
    return {key: value for key, value in options.items() if value is not None}


@models_app.command("pull")
def models_pull(
    source: Source,
    name: Name,
    quantize: Quantize = None,
    fp16: Fp16 = False,
    sha256: Sha256 = None,
    max_seq_length: MaxSeqLength = None,
    pooling: PoolingOption = None,
    normalize: Normalize = None,
) -> None:
    """Fetch or export a model and install it in this machine's model store under NAME."""
    from tasks.download import pull_options

    options = _options(quantize, fp16, sha256, max_seq_length, pooling, normalize)
    try:
        manifest = _store().pull(source, name, pull_options(options), get_settings())
    except EmbedqError as exc:
        raise _fail(exc) from exc
    typer.echo(
        f"prepared {manifest.name}: dim {manifest.dim}, {manifest.precision},"
        f" pooling {manifest.behaviour.pooling}, normalize {manifest.behaviour.normalize},"
        f" max_seq_length {manifest.behaviour.max_seq_length}"
    )


@models_app.command("register")
def models_register(
    source: Source,
    name: Name,
    quantize: Quantize = None,
    fp16: Fp16 = False,
    sha256: Sha256 = None,
    max_seq_length: MaxSeqLength = None,
    pooling: PoolingOption = None,
    normalize: Normalize = None,
) -> None:
    """Tell the fleet where NAME comes from: a worker host that lacks it prepares it from
    SOURCE (with these options) when a job first asks for it. Clears earlier failures."""
    from tasks import producer

    options = _options(quantize, fp16, sha256, max_seq_length, pooling, normalize)
    try:
        producer.register_model(source, name, options)
    except EmbedqError as exc:
        raise _fail(exc) from exc
    typer.echo(f"registered {name}: {source} {json.dumps(options)}")


@models_app.command("hosts")
def models_hosts() -> None:
    """What each worker host has prepared (or is preparing, or failed to prepare, and why)."""
    from storage import repository

    with _store_session() as session:
        rows = repository.list_prepared(session)
        if not rows:
            typer.echo("no worker host has recorded a model yet")
        for row in rows:
            typer.echo(
                f"{row.name}\t{row.host}\t{row.state}\t{row.dim or '-'}\t{row.precision or '-'}"
                f"\t{row.updated_at:%Y-%m-%d %H:%M:%S}" + (f"\t{row.error}" if row.error else "")
            )


@models_app.command("probe")
def models_probe(
    name: str,
    device: Annotated[int | None, typer.Option(help="GPU device id to bind to")] = None,
) -> None:
    """Load NAME as a worker would (on DEVICE) and embed one text; exits non-zero when the
    engine cannot be built, e.g. a GPU provider that fell back under the error policy."""
    from worker.engine import Engine

    settings = get_settings()
    try:
        store = _store()
        store.get(name)
        engine = Engine.load(store.path(name), settings, device)
        engine.encode(["probe"])
    except EmbedqError as exc:
        raise _fail(exc) from exc
    typer.echo(f"{name} runs on {engine.provider}" + ("" if device is None else f" ({device})"))


@models_app.command("list")
def models_list() -> None:
    """List prepared models."""
    manifests = _store().list()
    if not manifests:
        typer.echo(f"no models in {get_settings().model_dir}")
    for m in manifests:
        typer.echo(f"{m.name}\t{m.dim}\t{m.precision}\t{m.source}\t{m.created_at:%Y-%m-%d %H:%M}")


@models_app.command("show")
def models_show(name: str) -> None:
    """Show a model's manifest and the execution providers this machine offers."""
    from worker import providers
    from worker.manifest import dump

    try:
        manifest = _store().get(name)
    except EmbedqError as exc:
        raise _fail(exc) from exc
    typer.echo(dump(manifest))
    typer.echo(f"providers available here: {', '.join(providers.available())}")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Create or migrate the schema at EMBEDQ_DATABASE_URL (SQLite file by default)."""
    from storage import schema

    url = get_settings().database_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    schema.upgrade(url, revision)
    typer.echo(f"schema at {revision} in {_redacted(url)}")


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command("embed")
def embed(
    texts: Annotated[list[str] | None, typer.Argument(help="texts to embed")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="JSON Lines input")] = None,
    model: Annotated[str | None, typer.Option(help="default: EMBEDQ_DEFAULT_MODEL")] = None,
    queue: Annotated[str, typer.Option(help="interactive or bulk")] = "interactive",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait for the vectors")] = True,
    out: Annotated[Path | None, typer.Option(help="write float32 vectors to this .npy")] = None,
) -> None:
    """Submit a job (through the queue, or in-process when no broker is configured)."""
    import numpy as np

    from tasks import producer

    try:
        items = list(texts or []) + (read_jsonl(file) if file else [])
        job = producer.submit(items, model=model, queue=queue)
        typer.echo(f"job {job.id} submitted: {len(items)} texts", err=True)
        if not wait:
            typer.echo(job.id)
            return
        status = job.wait()
    except EmbedqError as exc:
        raise _fail(exc) from exc
    typer.echo(
        f"job {job.id} {status['state']}: {status['done']} done, {status['failed']} failed"
        + (f" ({status['error']})" if status["error"] else ""),
        err=True,
    )
    if out is not None:
        _, vectors = job.embeddings()
        np.save(out, vectors)
        typer.echo(f"wrote {vectors.shape[0]}x{vectors.shape[1]} float32 to {out}", err=True)
    if status["state"] != "succeeded":
        raise typer.Exit(code=1)


@app.command("jobs")
def jobs(limit: Annotated[int, typer.Option(help="how many")] = 20) -> None:
    """List recent jobs, newest first."""
    from storage import repository

    with _store_session() as session:
        for job in repository.list_jobs(session, limit):
            typer.echo(
                f"{job.id}\t{job.state}\t{job.done_items}/{job.total_items}"
                f"\t{job.failed_items} failed\t{job.model_name}\t{job.queue}"
                f"\t{job.created_at:%Y-%m-%d %H:%M:%S}"
            )


@app.command("job")
def job(job_id: str) -> None:
    """Show a job's state, counts and timing summary."""
    from storage import repository

    with _store_session() as session:
        found = repository.get_job(session, job_id)
        if found is None:
            raise _fail(EmbedqError(f"job {job_id} is not in the store"))
        timing = repository.job_timing(session, job_id)
        typer.echo(f"job {found.id}: {found.state}, model {found.model_name}, queue {found.queue}")
        typer.echo(
            f"items: {found.total_items} total, {found.done_items} done,"
            f" {found.failed_items} failed"
        )
        if found.error:
            typer.echo(f"error: {found.error}")
        typer.echo(", ".join(f"{key} {value:g}" for key, value in timing.items()))
        stuck_after = get_settings().stuck_after
        stuck = repository.stuck_batches(session, job_id, stuck_after)
        if stuck:
            typer.echo(
                f"stuck: {stuck} batches in flight for more than {stuck_after}s and none of this"
                f" job's batches finished in that time: no worker is on them (is one consuming"
                f" {found.queue!r}?). Running the backfill again ({found.tag or 'its name'})"
                f" sends them again."
            )


def _store_session() -> Any:
    from storage.session import scope, sessions_for

    return scope(sessions_for(get_settings().database_url))


@app.command("worker")
def worker(
    queues: Annotated[str, typer.Option("--queues", "-Q", help="comma-separated")] = (
        "interactive,bulk"
    ),
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", "-c", help="default: one per GPU, else EMBEDQ_PROCESSES"),
    ] = None,
    name: Annotated[str, typer.Option("--name", "-n", help="Celery node name")] = "embedq@%h",
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO",
) -> None:
    """Start a Celery worker with embedq's defaults, printed first: prefork, one process per
    GPU (each bound to its device) or EMBEDQ_PROCESSES x intra-op threads fitted to the cores.
    A GPU worker first checks that each device really runs the default model on the GPU."""
    import os
    import subprocess

    settings = get_settings()
    processes = concurrency or settings.worker_processes()
    if processes != settings.processes and not settings.gpu_devices:
        # Children size their ONNX thread pools from EMBEDQ_PROCESSES.
        os.environ["EMBEDQ_PROCESSES"] = str(processes)
        get_settings.cache_clear()
        settings = get_settings()
    shown = {
        "broker": _redacted(settings.celery_broker()),
        "database": _redacted(settings.database_url),
        "queues": f"{queues} + {settings.download_queue()}",
        "pool": f"prefork x {processes}",
        "gpu devices": ",".join(map(str, settings.gpu_devices)) or "none (CPU worker)",
        "providers": ",".join(settings.providers) or "auto (CUDA when listed, else CPU)",
        "provider fallback": settings.fallback_policy(),
        "intra-op threads": f"{settings.threads()} per process (cores: {os.cpu_count()})",
        "default model": settings.default_model or "none",
        "model dir": str(settings.model_dir),
        "time limits": f"batch {settings.task_time_limit}s, download"
        f" {settings.download_time_limit}s, visibility {settings.visibility()}s",
    }
    width = max(map(len, shown))
    for key, value in shown.items():
        typer.echo(f"{key:>{width}}  {value}", err=True)
    if settings.gpu_devices and settings.default_model:
        # In throwaway processes: the worker's parent must create no CUDA context before fork.
        for device in settings.gpu_devices:
            probe = [sys.executable, "-m", "tasks.cli", "models", "probe"]
            done = subprocess.run([*probe, settings.default_model, "--device", str(device)])
            if done.returncode != 0:
                typer.echo(f"error: GPU {device} cannot run {settings.default_model}", err=True)
                raise typer.Exit(code=3)
    from worker.app import app as celery_app

    celery_app.worker_main(
        [
            "worker",
            "--pool=prefork",
            f"--concurrency={processes}",
            f"--queues={queues}",
            f"--hostname={name}",
            f"--loglevel={loglevel}",
        ]
    )


@app.command("backfill")
def backfill(
    name: Annotated[str, typer.Argument(help="the backfill's name; run it again to resume")],
    source: Annotated[
        str | None, typer.Option(help="a .jsonl/.csv/.parquet file, or a SQLAlchemy URL")
    ] = None,
    sql: Annotated[str | None, typer.Option(help="query to run against --source")] = None,
    id_field: Annotated[str | None, typer.Option(help="id field or column (default id)")] = None,
    text_field: Annotated[
        str | None, typer.Option(help="text field or column (default text)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="default: EMBEDQ_DEFAULT_MODEL")] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="send the failed items again")
    ] = False,
    max_in_flight: Annotated[int | None, typer.Option(help="unfinished batches at most")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Embed a whole source into the store as one resumable job on the bulk queue, with a live
    progress bar; with only NAME, show that backfill's summary and failed items."""
    from tasks import backfill as backfills
    from tasks import readers

    settings = get_settings()
    try:
        if source is not None:
            from tasks.producer import ensure_schema

            if settings.broker_url is None:
                ensure_schema(settings.database_url)
            reader = readers.open_source(source, id_field=id_field, text_field=text_field, sql=sql)
            options = backfills.Options(
                name=name,
                model=model or settings.default_model or "",
                batch_size=settings.job_batch_size,
                max_in_flight=max_in_flight or settings.backfill_max_in_flight,
                stuck_after=settings.stuck_after,
                max_attempts=settings.max_retries,
                retry_failed=retry_failed,
            )
            if not options.model:
                raise EmbedqError("no --model given and EMBEDQ_DEFAULT_MODEL is not set")
            run = backfills.BackfillRun(reader, options, settings)
            if as_json:
                run.run()
            else:
                _run_with_bar(run)
        outcome = backfills.summary(settings.database_url, name)
    except EmbedqError as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(outcome, indent=2))
    else:
        _print_summary(outcome)
    if outcome["state"] != "succeeded":
        raise typer.Exit(code=1)


def _run_with_bar(run: Any) -> None:
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    started = time.monotonic()
    first: dict[str, int] = {}
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(run.options.name, total=None, rate="", failed=0)

        def report(progress: Any) -> None:
            first.setdefault("done", progress.done)
            first.setdefault("tokens", progress.tokens)
            elapsed = max(time.monotonic() - started, 1e-3)
            texts = (progress.done - first["done"]) / elapsed
            tokens = (progress.tokens - first["tokens"]) / elapsed
            bar.update(
                task,
                total=progress.total,
                completed=progress.done + progress.failed,
                rate=f"{texts:,.0f} texts/s {tokens:,.0f} tok/s",
                failed=progress.failed,
            )

        run.run(report)


def _print_summary(outcome: dict[str, Any]) -> None:
    items = outcome["items"] if outcome["items"] is not None else "unsealed"
    typer.echo(
        f"backfill {outcome['name']} ({outcome['state']}, run {outcome['runs']}): items {items},"
        f" done {outcome['done']} (reused {outcome['reused']}), failed {outcome['failed']}"
    )
    if outcome["wall_s"] is not None:
        typer.echo(f"wall {outcome['wall_s']}s, {outcome['items_per_s']} items/s")
    for worker in outcome["workers"]:
        typer.echo(
            f"  worker {worker['host']}:{worker['pid']}: {worker['texts']} texts in"
            f" {worker['batches']} batches"
        )
    for reason, count in outcome["failure_reasons"].items():
        typer.echo(f"  failed {count}: {reason}")
    if outcome["failed_examples"]:
        typer.echo(f"  e.g. items {', '.join(outcome['failed_examples'])}")
    if outcome["in_flight_batches"]:
        typer.echo(f"  {outcome['in_flight_batches']} batches still in flight")


@app.command("export")
def export(
    job_or_name: Annotated[str, typer.Argument(help="a job id or a backfill name")],
    out: Annotated[Path, typer.Option(help="file to write")],
    fmt: Annotated[str, typer.Option("--format", help="npy, jsonl or parquet")] = "npy",
) -> None:
    """Write a job's ids and vectors to a file, streamed from the store."""
    from tasks.export import export as write

    try:
        written = write(get_settings().database_url, job_or_name, fmt, out)
    except EmbedqError as exc:
        raise _fail(exc) from exc
    typer.echo(f"wrote {written} vectors to {out}", err=True)


@app.command("stats")
def stats(
    since: Annotated[str | None, typer.Option(help="e.g. 15m, 1h, 7d")] = None,
    model: Annotated[str | None, typer.Option(help="one model")] = None,
    job_id: Annotated[str | None, typer.Option("--job", help="one job")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="also draw throughput and latency over time (PNG)")
    ] = None,
) -> None:
    """Per model, worker and provider: texts/s, tokens/s, padding waste and p50/p95/p99 of each
    batch stage and of the queue wait, from the store's batch statistics."""
    from tasks import stats as report

    url = get_settings().database_url
    try:
        window = report.parse_since(since) if since else None
        rows = report.report(url, window, model, job_id)
        drawn = report.plot(url, plot, window, model, job_id) if plot else 0
    except EmbedqError as exc:
        raise _fail(exc) from exc
    typer.echo(json.dumps(rows, indent=2) if as_json else report.render(rows))
    if plot:
        typer.echo(f"plotted {drawn} batches to {plot}", err=True)


@app.command("health")
def health(
    timeout: Annotated[float, typer.Option(help="seconds to wait for workers")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ping the workers; list what each consumes and serves, and the queue depths. Exits 1 when
    a queue holds messages that no answering worker consumes."""
    from tasks import health as fleet
    from worker.app import app as celery_app

    result = fleet.check(celery_app, get_settings().database_url, timeout)
    typer.echo(json.dumps(result, indent=2) if as_json else fleet.render(result))
    if not result["ok"]:
        raise typer.Exit(code=1)


@app.command("flower")
def flower(
    port: Annotated[int, typer.Option(help="HTTP port")] = 5555,
    address: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="no login, for local use only")
    ] = False,
) -> None:
    """Start Flower on this app with basic authentication (EMBEDQ_FLOWER_USER and
    EMBEDQ_FLOWER_PASSWORD), bound to loopback by default: Flower serves /metrics and
    /healthcheck without authentication."""
    import os

    settings = get_settings()
    argv = ["flower", f"--port={port}", f"--address={address}"]
    if settings.flower_user and settings.flower_password:
        argv.append(f"--basic-auth={settings.flower_user}:{settings.flower_password}")
    elif insecure_no_auth:
        os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"
        typer.echo("warning: Flower runs without authentication", err=True)
    else:
        raise _fail(
            EmbedqError(
                "set EMBEDQ_FLOWER_USER and EMBEDQ_FLOWER_PASSWORD (or pass --insecure-no-auth"
                " for local use)"
            )
        )
    from worker.app import app as celery_app

    typer.echo(
        f"Flower on http://{address}:{port} for {_redacted(settings.celery_broker())}", err=True
    )
    celery_app.start(argv)


@app.command("encode")
def encode(
    model: Annotated[str, typer.Option("--model", help="a prepared model's name")],
    file: Annotated[Path, typer.Option("--file", "-f", help="JSON Lines: strings or {text}")],
    out: Annotated[Path | None, typer.Option(help="write float32 vectors to this .npy")] = None,
) -> None:
    """Embed a JSON Lines file in this process (no queue), for checking a model by hand."""
    import numpy as np

    from worker.engine import Engine

    settings = get_settings()
    try:
        texts = read_jsonl(file)
        store = _store()
        store.get(model)  # a clear "not prepared, pull it" error before loading anything
        engine = Engine.load(store.path(model), settings)
        vectors, stats = [], []
        for start in range(0, len(texts), settings.max_batch_items):
            result = engine.encode(texts[start : start + settings.max_batch_items])
            vectors.append(result.vectors)
            stats.append(result.stats)
    except EmbedqError as exc:
        raise _fail(exc) from exc
    matrix = np.concatenate(vectors)
    tokens = sum(s.tokens for s in stats)
    ms = sum(s.total_ms for s in stats)
    typer.echo(
        f"{len(texts)} texts, {tokens} tokens, {sum(s.truncated for s in stats)} truncated,"
        f" {ms:.0f} ms on {engine.provider} ({len(texts) / (ms / 1000):.1f} texts/s)",
        err=True,
    )
    if out is not None:
        np.save(out, matrix)
        typer.echo(f"wrote {matrix.shape[0]}x{matrix.shape[1]} float32 to {out}", err=True)
    else:
        for row in matrix:
            typer.echo(json.dumps([round(float(x), 6) for x in row]))


def read_jsonl(path: Path) -> list[str]:
    """Texts from JSON Lines: each line a JSON string or an object with a ``text`` field."""
    from worker.errors import InputError

    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{path}:{number} is not JSON: {exc}") from exc
            if isinstance(item, dict):
                item = item.get("text")
            if not isinstance(item, str):
                raise InputError(f'{path}:{number} is neither a JSON string nor {{"text": ...}}')
            texts.append(item)
    if not texts:
        raise InputError(f"{path} holds no texts")
    return texts


if __name__ == "__main__":
    app()
