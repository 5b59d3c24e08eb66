"""Commands about jobs: ``embed`` (a queued job), ``jobs``, ``job``, ``export``, and ``encode``
(the same model run in this process, for a check by hand, with no job at all)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from storage import jobs, ledger, stalled
from storage.session import scope, sessions_for
from tasks.cli import present
from tasks.cli.failures import (
    Code,
    ending,
    fail,
    one_line,
    scrub,
)
from tasks.cli.inputs import read_texts
from tasks.names import Queue
from worker.errors import EmbedqError
from worker.settings import get_settings

SHOWN_OVERDUE = 10  # batches ``embedq job`` lists; the rest are counted


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
    """Embed texts as a queued job: the workers run it and the job store keeps its vectors.

    The job and its batches are recorded in the store and sent to the workers' queue (with
    EMBEDQ_BROKER_URL unset, a worker inside this process runs them). `embedq job ID` follows
    it and `embedq export` reads its vectors back. To try a model by hand in this process, with
    no queue and nothing stored, use `embedq encode`.
    """
    import numpy as np  # numpy: loaded only for the .npy this command may write

    from tasks import producer  # the producer loads numpy

    try:
        items = list(texts or []) + (read_texts(file) if file else [])
        job = producer.submit(items, model=model, queue=queue)
        if not get_settings().local_mode:  # local mode ran it already
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
            f"error: {ending(exc)[0]} (the job goes on; see `embedq job {job.id}`)", err=True
        )
        raise typer.Exit(code=Code.TIMEOUT) from exc
    except EmbedqError as exc:
        raise fail(exc) from exc
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
        typer.echo(f"error: {scrub(one_line(ended))}", err=True)
        raise typer.Exit(code=Code.FAILED)


def list_jobs(limit: Annotated[int, typer.Option(help="how many")] = 20) -> None:
    """List recent jobs, newest first."""
    with scope(sessions_for(get_settings().database_url)) as session:
        for found in jobs.list_jobs(session, limit):
            present.job_row(found)


def job(job_id: str) -> None:
    """Show a job's state, counts, batches and timing, and the batches that stopped moving."""
    settings = get_settings()
    stuck_after = settings.stuck_after
    with scope(sessions_for(settings.database_url)) as session:
        found = jobs.get_job(session, job_id)
        if found is None:
            raise fail(EmbedqError(f"job {job_id} is not in the store"))
        timing = jobs.job_timing(session, job_id)
        present.job_detail(found, ledger.job_batches(session, job_id), timing)
        overdue = stalled.overdue_batches(session, stuck_after, job_id=job_id, limit=SHOWN_OVERDUE)
        count = stalled.count_overdue(session, stuck_after, job_id=job_id)
        present.overdue(overdue, count, stuck_after, settings.sweep_interval)


def export(
    job_or_name: Annotated[str, typer.Argument(help="a job id or a backfill name")],
    out: Annotated[Path, typer.Option(help="file to write")],
    fmt: Annotated[str, typer.Option("--format", help="npy, jsonl or parquet")] = "npy",
) -> None:
    """Write a job's ids and vectors to a file, streamed from the store."""
    from tasks import vector_files  # loads numpy

    try:
        written = vector_files.export(get_settings().database_url, job_or_name, fmt, out)
    except EmbedqError as exc:
        raise fail(exc) from exc
    typer.echo(f"wrote {written} vectors to {out}", err=True)


def encode(
    model: Annotated[str, typer.Option("--model", help="a prepared model's name")],
    file: Annotated[Path, typer.Option("--file", "-f", help="JSON Lines: strings or {text}")],
    out: Annotated[Path | None, typer.Option(help="write float32 vectors to this .npy")] = None,
) -> None:
    """Embed a file in this process to check a model by hand: no queue, no job, nothing stored.

    The prepared model is loaded here, as a worker would load it, and the vectors are printed
    (or written to --out) with the time taken; the job store and the broker are not used. To
    embed texts as a job that the workers run and the store keeps, use `embedq embed`.
    """
    import numpy as np  # numpy, onnxruntime and tokenizers: loaded only to run a model here

    from worker.engine import Engine
    from worker.model_store import ModelStore

    settings = get_settings()
    try:
        texts = read_texts(file)
        store = ModelStore(settings.model_dir)
        store.get(model)  # a clear "not prepared, pull it" error before loading anything
        engine = Engine.load(store.path(model), settings)
        vectors, stats = [], []
        for start in range(0, len(texts), settings.max_batch_items):
            result = engine.encode(texts[start : start + settings.max_batch_items])
            vectors.append(result.vectors)
            stats.append(result.stats)
    except EmbedqError as exc:
        raise fail(exc) from exc
    matrix = np.concatenate(vectors)
    present.encoded(len(texts), stats, engine.provider)
    if out is not None:
        np.save(out, matrix)
        typer.echo(f"wrote {matrix.shape[0]}x{matrix.shape[1]} float32 to {out}", err=True)
    else:
        for row in matrix:
            typer.echo(json.dumps([round(float(x), 6) for x in row]))
