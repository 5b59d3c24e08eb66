"""Commands for operating a fleet: ``stats`` (throughput and latency from the store),
``health`` (the workers and queues, now) and ``db upgrade`` (the store's schema)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from storage.session import redacted
from tasks.cli.failures import Code, fail
from worker.errors import EmbedqError
from worker.settings import get_settings

db_app = typer.Typer(help="Create and migrate the job store's schema.", no_args_is_help=True)


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
    from tasks.cli import stats as report  # loads numpy

    url = get_settings().database_url
    try:
        window = report.parse_since(since) if since else None
        rows = report.report(url, window, model, job_id)
        drawn = report.plot(url, plot, window, model, job_id) if plot else 0
    except EmbedqError as exc:
        raise fail(exc) from exc
    typer.echo(json.dumps(rows, indent=2) if as_json else report.render(rows))
    if plot:
        typer.echo(f"plotted {drawn} batches to {plot}", err=True)


def health(
    timeout: Annotated[float, typer.Option(help="seconds to wait for workers")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ping the workers; list what each consumes and serves, and the queue depths. Exits 1 when
    a queue holds messages that no answering worker consumes, or a batch is overdue."""
    from tasks.fleet import health as fleet  # loads the Celery app
    from worker.app import app as celery_app

    settings = get_settings()
    result = fleet.check(celery_app, settings, timeout)
    typer.echo(json.dumps(result.as_json(), indent=2) if as_json else fleet.render(result))
    if not result.ok:
        problems = [f"no worker consumes {queue}" for queue in result.unserved]
        if result.overdue_batches:
            problems.append(f"{result.overdue_batches} batches overdue")
        typer.echo(f"error: the fleet is not healthy: {'; '.join(problems)}", err=True)
        raise typer.Exit(code=Code.FAILED)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Create or migrate the schema at EMBEDQ_DATABASE_URL (SQLite file by default)."""
    from storage import schema  # loads alembic

    url = get_settings().database_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    schema.upgrade(url, revision)
    typer.echo(f"schema at {revision} in {redacted(url)}")
