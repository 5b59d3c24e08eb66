"""``embedq backfill``: embed a whole source as one resumable job, or show how one went."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from tasks.backfill import readers
from tasks.cli import present
from tasks.cli.failures import Code, fail
from tasks.cli.inputs import NamedSource
from worker.errors import EmbedqError
from worker.settings import get_settings


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
    model: Annotated[
        str | None,
        typer.Option(
            help="default: the collection's current model, else EMBEDQ_DEFAULT_MODEL; another"
            " one builds a new version beside the current one"
        ),
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="send the failed items again")
    ] = False,
    prune: Annotated[
        bool,
        typer.Option("--prune", help="delete the vectors of ids the source no longer has"),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="read the source and estimate the run (tokens, time); send nothing"
        ),
    ] = False,
    max_in_flight: Annotated[
        int | None, typer.Option(min=1, help="unfinished batches at most")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Embed a whole source into the store as one resumable job on the bulk queue, with a live
    progress bar; run again, sync it: only new ids and ids whose text changed are embedded, and
    ids gone from the source are counted (deleted with --prune). With only NAME, show that
    backfill's summary and failed items."""
    from tasks import backfill as backfills  # loads numpy (through the producer)
    from tasks.producer import ensure_schema  # loads numpy

    settings = get_settings()
    version: int | None = None
    try:
        if source is not None:
            if settings.local_mode:
                ensure_schema(settings.database_url)
            reader = NamedSource(
                readers.open_source(source, id_field=id_field, text_field=text_field, sql=sql),
                source,
            )
            options = backfills.Options(  # limits left out are the settings'
                name=name,
                model=model,
                max_in_flight=max_in_flight,
                retry_failed=retry_failed,
                prune=prune,
            )
            if dry_run:
                from tasks.backfill import estimate

                planned = estimate.dry_run(reader, options, settings)
                if as_json:
                    typer.echo(json.dumps(planned.as_json(), indent=2))
                else:
                    present.estimate(planned)
                return
            run = backfills.BackfillRun(reader, options, settings)
            if as_json:
                run.run()
            else:
                present.run_with_bar(run)
            version = run.version
        elif dry_run:
            raise EmbedqError("--dry-run reads a source: give --source")
        outcome = backfills.summary(settings.database_url, name, version=version)
    except EmbedqError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(outcome.as_json(), indent=2))
    else:
        present.backfill_summary(outcome)
    if outcome.state != "succeeded":
        ended = "ended" if outcome.state in ("failed", "partially_failed") else "is"
        typer.echo(
            f"error: backfill {name} {ended} {outcome.state}: {outcome.done} done,"
            f" {outcome.failed} failed of {outcome.items or 'unsealed'} items",
            err=True,
        )
        raise typer.Exit(code=Code.FAILED)
