"""The ``embedq`` command line.

Commands import the heavy parts (onnxruntime, tokenizers, torch) inside their bodies, so
``embedq --help`` stays fast and a producer-only install can use the queue commands.

Every failure ends with one line on stderr, ``error: ...``, and an exit code a script can act
on (``main`` maps what escapes a command; ``--verbose`` adds the traceback). Secrets never
appear: URLs are shown with the password hidden, and passwords are scrubbed from driver text.

    0   done
    1   the job (or backfill) ended with failed items; ``health`` found a problem
    2   bad input or usage: a file, a line, an option, a model name, a setting
    3   a GPU cannot run the default model (``worker``)
    4   the job store, the broker or a model source cannot be reached, or refuses us: try later
    5   ``embed --timeout`` passed: the job goes on (see ``embedq job ID``)
    70  an unexpected error (a bug): its type and first line; ``--verbose`` for the traceback
    130 interrupted
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from tasks.names import Queue
from worker.errors import EmbedqError, InputError, TransientError, UnavailableError
from worker.manifest import Pooling, Precision
from worker.settings import get_settings


class Code(IntEnum):
    """Exit codes (see the table above)."""

    OK = 0
    FAILED = 1
    INPUT = 2
    GPU = 3
    UNREACHABLE = 4
    TIMEOUT = 5
    BUG = 70
    INTERRUPTED = 130


# Locals are never shown: they hold URLs with passwords.
app = typer.Typer(
    help="Text embeddings as background jobs.",
    epilog="Exit codes: 0 done, 1 the job ended with failures, 2 bad input or usage,"
    " 4 the job store, broker or a model source cannot be reached, 5 --timeout passed (the job"
    " goes on), 70 an unexpected error (--verbose shows its traceback), 130 interrupted.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
models_app = typer.Typer(
    help="Prepare and inspect models in the model store.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
db_app = typer.Typer(help="Create and migrate the job store's schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


_verbose = False


@app.callback()
def setup(
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="debug logs, and the traceback of a failure"),
    ] = False,
) -> None:
    global _verbose
    _verbose = verbose
    from worker.logs import use_json

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # migrations in local mode are chatter around a command's own lines
        logging.getLogger("alembic").setLevel(logging.WARNING)
    use_json()


def main() -> None:
    """The ``embedq`` program: run the command line, and end every failure with one line on
    stderr and an exit code (see the module's table), never a traceback unless ``--verbose``."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # usage: an unknown command or option, a bad value
        code = exc.exit_code
        if type(exc).__name__ != "NoArgsIsHelpError":  # whose help is already printed
            ctx: typer.Context | None = getattr(exc, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {_one_line(exc.format_message())}{where}", err=True)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        code = Code.INTERRUPTED
    except Exception as exc:
        if _verbose:
            traceback.print_exception(exc)
        line, code = _ending(exc)
        typer.echo(f"error: {line}", err=True)
    sys.exit(code if isinstance(code, int) else Code.OK)


def _fail(exc: EmbedqError) -> typer.Exit:
    line, code = _ending(exc)
    typer.echo(f"error: {line}", err=True)
    return typer.Exit(code=code)


def _ending(exc: BaseException) -> tuple[str, int]:
    """The line (after ``error:``) and the exit code that end a command failing with ``exc``."""
    import pydantic
    import sqlalchemy.exc

    if isinstance(exc, TransientError):  # the store, the broker, a model source: try later
        refused = _password_problem(exc)
        return refused or _scrub(_one_line(str(exc))), Code.UNREACHABLE
    if isinstance(exc, EmbedqError):
        return _scrub(_one_line(str(exc))), Code.INPUT
    if isinstance(exc, UnicodeDecodeError):
        return f"the input is not UTF-8 text ({_bad_byte(exc)})", Code.INPUT
    if isinstance(exc, OSError) and exc.filename is not None:
        return _file_problem(exc), Code.INPUT
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and _is_store_failure(exc):
        return _store_problem(exc), Code.UNREACHABLE
    broker = _broker_problem(exc)
    if broker is not None:
        return broker, Code.UNREACHABLE
    if isinstance(exc, pydantic.ValidationError) and exc.title == "Settings":
        first = exc.errors()[0]
        name = "EMBEDQ_" + "_".join(map(str, first["loc"])).upper()
        return _scrub(f"setting {name} is invalid: {first['msg']}"), Code.INPUT
    return (
        f"unexpected {type(exc).__name__}: {_scrub(_one_line(str(exc)))}"
        " (run `embedq --verbose ...` for the traceback)",
        Code.BUG,
    )


def _one_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return "; ".join(lines) if lines else "(no message)"


def _first_line(message: object) -> str:
    return next((line.strip() for line in str(message).splitlines() if line.strip()), "")


def _secrets() -> list[str]:
    """Passwords the settings hold (in URLs or as secrets), longest first."""
    from pydantic import SecretStr

    try:
        settings = get_settings()
    except Exception:  # invalid settings: nothing was read, so nothing to hide
        return []
    found: list[str] = []
    for value in dict(settings).values():
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, str) and "://" in value and (password := _password(value)):
            found.append(password)
    return sorted({s for s in found if s}, key=len, reverse=True)


def _scrub(line: str) -> str:
    for secret in _secrets():
        line = line.replace(secret, "***")
    return line


def _bad_byte(exc: UnicodeDecodeError, offset: int | None = None) -> str:
    byte = f"byte 0x{exc.object[exc.start]:02x}"
    return byte if offset is None else f"{byte} at offset {offset}"


def _file_problem(exc: OSError) -> str:
    path = exc.filename
    if isinstance(exc, FileNotFoundError):
        return f"{path} does not exist"
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a folder, not a file"
    if isinstance(exc, NotADirectoryError):
        return f"{path}: a part of the path is not a folder"
    if isinstance(exc, PermissionError):
        return f"{path} cannot be read or written: permission denied"
    return _scrub(f"{path}: {exc.strerror or _first_line(exc)}")


def _is_store_failure(exc: Any) -> bool:
    import sqlalchemy.exc

    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return True
    return type(exc.orig).__name__ == "UndefinedTable"  # PostgreSQL without the schema


def _store_problem(exc: Any) -> str:
    """What an unusable job store says, with its URL (password hidden)."""
    try:
        url = get_settings().database_url
    except Exception:  # invalid settings: name no URL
        url = None
    where = "the job store" + (f" at {_redacted(url)}" if url else "")
    said = _scrub(_first_line(exc.orig) or _first_line(exc))
    if "no such table" in said or type(exc.orig).__name__ == "UndefinedTable":
        return f"{where} has no embedq schema (run `embedq db upgrade`): {said}"
    if exc.statement is not None and not exc.connection_invalidated:
        return f"{where} failed: {said}"
    if url and url.startswith("sqlite:///") and "unable to open" in said:
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            said += f" (the folder {folder} does not exist)"
    return f"{where} cannot be reached: {said}"


def _broker_problem(exc: BaseException) -> str | None:
    """What an unusable broker says, with its URL (password hidden); ``None``: not the broker."""
    import kombu.exceptions
    import redis.exceptions

    if not isinstance(
        exc,
        redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | redis.exceptions.AuthenticationError
        | kombu.exceptions.OperationalError,
    ):
        return None
    try:
        where = f"the broker at {_redacted(get_settings().celery_broker())}"
    except Exception:  # invalid settings: name no URL
        where = "the broker"
    said = _scrub(_first_line(exc)) or type(exc).__name__
    return _password_problem(exc) or f"{where} cannot be reached: {said}"


def _password_problem(exc: BaseException) -> str | None:
    """The line for a broker that refused our password (or asked for one), if it did."""
    import redis.exceptions

    seen: BaseException | None = exc
    for _ in range(10):  # the driver's error, wrapped by kombu and by the producer
        if seen is None or isinstance(seen, redis.exceptions.AuthenticationError):
            break
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    try:
        url = get_settings().celery_broker()
        where, password = f"the broker at {_redacted(url)}", _password(url)
    except Exception:  # invalid settings: name no URL
        where, password = "the broker", None
    said = _scrub(_first_line(seen)) or type(seen).__name__
    return f"{where} {'refuses the password' if password else 'asks for a password'}: {said}"


def _password(url: str) -> str | None:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password
    except Exception:  # not a URL SQLAlchemy parses
        return None


def _store() -> Any:
    from worker.model_store import ModelStore

    return ModelStore(get_settings().model_dir)


Source = Annotated[str, typer.Argument(help="hf://ORG/NAME[@REV], a URL, or a folder")]
Name = Annotated[str, typer.Option("--name", help="name to install the model under")]
Quantize = Annotated[str | None, typer.Option(help="int8: dynamic int8 for CPUs")]
Fp16 = Annotated[bool, typer.Option("--fp16", help="half precision, for GPUs")]
Bf16 = Annotated[
    bool,
    typer.Option("--bf16", help="bfloat16 on OpenVINO, for CPUs with AVX512-BF16 or AMX"),
]
Sha256 = Annotated[str | None, typer.Option(help="expected sha256 of a URL download")]
MaxSeqLength = Annotated[int | None, typer.Option(help="override the model's")]
PoolingOption = Annotated[Pooling | None, typer.Option(help="override the model's")]
Normalize = Annotated[
    bool | None, typer.Option("--normalize/--no-normalize", help="override the model's")
]


def _options(
    quantize: str | None,
    fp16: bool,
    bf16: bool,
    sha256: str | None,
    max_seq_length: int | None,
    pooling: Pooling | None,
    normalize: bool | None,
) -> dict[str, Any]:
    """The pull options as the catalog stores them (JSON), checked."""
    if quantize not in (None, "int8"):
        raise typer.BadParameter("only int8 is supported", param_hint="--quantize")
    if sum((quantize is not None, fp16, bf16)) > 1:
        raise typer.BadParameter("choose one of --quantize int8, --fp16 and --bf16")
    precision = (
        Precision.INT8
        if quantize
        else Precision.FP16
        if fp16
        else Precision.BF16
        if bf16
        else Precision.FP32
    )
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
    bf16: Bf16 = False,
    sha256: Sha256 = None,
    max_seq_length: MaxSeqLength = None,
    pooling: PoolingOption = None,
    normalize: Normalize = None,
) -> None:
    """Fetch or export a model and install it in this machine's model store under NAME."""
    from tasks.download import pull_options

    options = _options(quantize, fp16, bf16, sha256, max_seq_length, pooling, normalize)
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
    bf16: Bf16 = False,
    sha256: Sha256 = None,
    max_seq_length: MaxSeqLength = None,
    pooling: PoolingOption = None,
    normalize: Normalize = None,
) -> None:
    """Tell the fleet where NAME comes from: a worker host that lacks it prepares it from
    SOURCE (with these options) when a job first asks for it. Clears earlier failures."""
    from tasks import producer

    options = _options(quantize, fp16, bf16, sha256, max_seq_length, pooling, normalize)
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
    typer.echo(
        f"{name} runs on {engine.provider} in {engine.precision}"
        + ("" if device is None else f" ({device})")
    )


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
    """Show a model's manifest, the runtime and precision it would run in on this machine, and
    the execution providers this machine offers."""
    from worker import providers, runtimes
    from worker.manifest import dump

    try:
        manifest = _store().get(name)
    except EmbedqError as exc:
        raise _fail(exc) from exc
    typer.echo(dump(manifest))
    typer.echo(f"runs here on: {runtimes.describe_here(manifest, get_settings())}")
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
    """``url`` with its password hidden (SQLAlchemy and Redis URLs alike)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: keep the scheme and the host only
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}" if rest else "(not a URL)"


@app.command("embed")
def embed(
    texts: Annotated[list[str] | None, typer.Argument(help="texts to embed")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="JSON Lines input")] = None,
    model: Annotated[str | None, typer.Option(help="default: EMBEDQ_DEFAULT_MODEL")] = None,
    queue: Annotated[Queue, typer.Option(help="the queue to send the batches to")] = (
        Queue.INTERACTIVE
    ),
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait for the vectors")] = True,
    timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="seconds to wait at most (0: no limit); past it, exit 5 and the job goes on",
        ),
    ] = 600,
    out: Annotated[Path | None, typer.Option(help="write float32 vectors to this .npy")] = None,
) -> None:
    """Submit a job (through the queue, or in-process when no broker is configured)."""
    import numpy as np

    from tasks import producer

    try:
        items = list(texts or []) + (read_jsonl(file) if file else [])
        job = producer.submit(items, model=model, queue=queue)
        if get_settings().broker_url is not None:  # local mode ran it already
            typer.echo(f"job {job.id} submitted: {len(items)} texts", err=True)
        if not wait:
            typer.echo(job.id)
            return
        try:
            status = job.wait(timeout=timeout or None)
        except KeyboardInterrupt:
            goes_on = f"the job goes on; see `embedq job {job.id}`"
            typer.echo(f"error: interrupted ({goes_on})", err=True)
            raise typer.Exit(code=Code.INTERRUPTED) from None
    except producer.JobTimeoutError as exc:
        typer.echo(
            f"error: {_ending(exc)[0]} (the job goes on; see `embedq job {job.id}`)", err=True
        )
        raise typer.Exit(code=Code.TIMEOUT) from exc
    except EmbedqError as exc:
        raise _fail(exc) from exc
    ended = f"job {job.id} {status['state']}: {status['done']} done, {status['failed']} failed" + (
        f" ({status['error']})" if status["error"] else ""
    )
    succeeded = status["state"] == "succeeded"
    if succeeded:
        typer.echo(ended, err=True)
    if out is not None:
        _, vectors = job.embeddings()
        np.save(out, vectors)
        typer.echo(f"wrote {vectors.shape[0]}x{vectors.shape[1]} float32 to {out}", err=True)
    if not succeeded:
        typer.echo(f"error: {_scrub(_one_line(ended))}", err=True)
        raise typer.Exit(code=Code.FAILED)


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


SHOWN_OVERDUE = 10  # batches ``embedq job`` lists; the rest are counted


@app.command("job")
def job(job_id: str) -> None:
    """Show a job's state, counts, batches and timing, and the batches that stopped moving."""
    from storage import ledger, repository
    from storage.models import as_utc

    stuck_after = get_settings().stuck_after
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
        batches = ledger.job_batches(session, job_id)
        if batches:
            order = ["done", "sent", "failed", "abandoned"]
            states = sorted(batches, key=lambda s: (order.index(s) if s in order else 99, s))
            typer.echo("batches: " + ", ".join(f"{batches[s]} {s}" for s in states))
        if found.error:
            typer.echo(f"error: {found.error}")
        typer.echo(", ".join(f"{key} {value:g}" for key, value in timing.items()))
        overdue = ledger.overdue_batches(session, stuck_after, job_id=job_id, limit=SHOWN_OVERDUE)
        count = ledger.count_overdue(session, stuck_after, job_id=job_id)
        now = datetime.now(UTC)
        for batch in overdue:
            idle = (now - as_utc(batch.updated_at)).total_seconds()
            last = f", last error: {_one_line(batch.last_error)}" if batch.last_error else ""
            typer.echo(
                f"overdue: batch {batch.batch_index} ({batch.item_count} items, no progress for"
                f" {idle:.0f}s, attempts {batch.attempts}, sends {batch.sends}{last})"
            )
        if count > len(overdue):
            typer.echo(f"and {count - len(overdue)} more")
        if overdue:
            typer.echo(
                "workers re-send lost batches every EMBEDQ_SWEEP_INTERVAL"
                f" ({get_settings().sweep_interval:g}s); `embedq health` fails while any is"
                f" overdue (no progress for over EMBEDQ_STUCK_AFTER, {stuck_after:g}s)"
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
            reader = _NamedSource(
                readers.open_source(source, id_field=id_field, text_field=text_field, sql=sql),
                source,
            )
            options = backfills.Options(
                name=name,
                model=model or settings.default_model or "",
                batch_size=settings.job_batch_size,
                max_in_flight=max_in_flight or settings.backfill_max_in_flight,
                stuck_after=settings.stuck_after,
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
        ended = "ended" if outcome["state"] in ("failed", "partially_failed") else "is"
        typer.echo(
            f"error: backfill {name} {ended} {outcome['state']}: {outcome['done']} done,"
            f" {outcome['failed']} failed of {outcome['items'] or 'unsealed'} items",
            err=True,
        )
        raise typer.Exit(code=Code.FAILED)


@dataclass(frozen=True)
class _NamedSource:
    """A backfill source whose failures name it, not the job store: undecodable bytes, or a
    SQL source that cannot be reached or whose query fails."""

    reader: Any
    source: str

    @property
    def description(self) -> str:
        return str(self.reader.description)

    def count(self) -> int | None:
        with self._named():
            return self.reader.count()  # type: ignore[no-any-return]

    def rows(self) -> Iterator[Any]:
        with self._named():
            yield from self.reader.rows()

    @contextmanager
    def _named(self) -> Iterator[None]:
        import sqlalchemy.exc

        try:
            yield
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.source} is not UTF-8 text ({_bad_byte(exc)})") from exc
        except sqlalchemy.exc.DBAPIError as exc:
            where = f"the source at {_redacted(self.source)}"
            said = _scrub(_first_line(exc.orig) or _first_line(exc))
            if exc.statement is None or exc.connection_invalidated:
                raise UnavailableError(f"{where} cannot be reached: {said}") from exc
            raise InputError(f"the query on {where} fails: {said}") from exc


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
    if outcome.get("duplicates"):
        typer.echo(f"skipped {outcome['duplicates']} duplicate ids")
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
    a queue holds messages that no answering worker consumes, or a batch is overdue."""
    from tasks import health as fleet
    from worker.app import app as celery_app

    settings = get_settings()
    result = fleet.check(celery_app, settings.database_url, timeout, settings.stuck_after)
    typer.echo(json.dumps(result, indent=2) if as_json else fleet.render(result))
    if not result["ok"]:
        problems = [f"no worker consumes {queue}" for queue in result.get("unserved", [])]
        if result.get("overdue_batches"):
            problems.append(f"{result['overdue_batches']} batches overdue")
        typer.echo(f"error: the fleet is not healthy: {'; '.join(problems)}", err=True)
        raise typer.Exit(code=Code.FAILED)


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
    """Texts from JSON Lines in UTF-8: each line a JSON string or an object with a ``text``
    field. A bad line raises ``InputError`` naming the file and the line."""
    texts: list[str] = []
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM is fine
            except UnicodeDecodeError as exc:
                where = _bad_byte(exc, offset + len(raw) - len(exc.object) + exc.start)
                raise InputError(f"{path}:{number} is not UTF-8 text ({where})") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{path}:{number} is not JSON: {exc}") from None
            if isinstance(item, dict):
                item = item.get("text")
            if not isinstance(item, str):
                raise InputError(f'{path}:{number} is neither a JSON string nor {{"text": ...}}')
            texts.append(item)
    if not texts:
        raise InputError(f"{path} holds no texts")
    return texts


if __name__ == "__main__":
    main()
