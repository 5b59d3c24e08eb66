"""What the commands print: the backfill's progress bar and summary, a job's detail, tables.

Results go to stdout (a script reads them); notices, progress and the final ``error:`` line go
to stderr.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer

from storage.models import Batch, Job, PreparedModel, as_utc
from tasks.cli.failures import one_line
from worker.manifest import Manifest

if TYPE_CHECKING:
    from tasks.backfill import BackfillProgress, BackfillRun, BackfillSummary
    from tasks.backfill.estimate import Estimate
    from worker.engine import EncodeStats


def run_with_bar(run: BackfillRun) -> None:
    """Run the backfill under a live bar: items, rate (texts and tokens per second since this
    run started), failures, elapsed time and ETA."""
    from rich.progress import (  # rich's progress: loaded only for a backfill's bar
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

        def report(progress: BackfillProgress) -> None:
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


def backfill_summary(outcome: BackfillSummary) -> None:
    """A backfill's summary (``tasks.backfill.summary``) as lines."""
    items = outcome.items if outcome.items is not None else "unsealed"
    typer.echo(
        f"backfill {outcome.name} ({outcome.state}, run {outcome.runs}): items {items},"
        f" done {outcome.done} (reused {outcome.reused}), failed {outcome.failed}"
    )
    current = next((v.version for v in outcome.versions if v.current), None)
    if len(outcome.versions) > 1 or current != outcome.version:
        readers = (
            "readers get it"
            if current == outcome.version
            else f"readers get version {current}; `embedq collection {outcome.name} use"
            f" {outcome.version}` switches them"
        )
        typer.echo(f"version {outcome.version} ({outcome.model}): {readers}")
    sync = outcome.last_sync
    if sync:
        removed = "removed" if sync.get("pruned") else "not in the source (--prune removes them)"
        typer.echo(
            f"last run: {sync.get('unchanged', 0)} unchanged, {sync.get('new', 0)} new,"
            f" {sync.get('changed', 0)} changed, {sync.get('removed', 0)} {removed}"
        )
        examples = sync.get("removed_examples") or []
        if sync.get("removed") and isinstance(examples, list):
            typer.echo(f"  e.g. ids {', '.join(map(str, examples))}")
    if outcome.duplicates:
        typer.echo(f"skipped {outcome.duplicates} duplicate ids")
    if outcome.wall_s is not None:
        typer.echo(f"wall {outcome.wall_s}s, {outcome.items_per_s} items/s")
    for worker in outcome.workers:
        typer.echo(
            f"  worker {worker.host}:{worker.pid}: {worker.texts} texts in {worker.batches} batches"
        )
    for reason, count in outcome.failure_reasons.items():
        typer.echo(f"  failed {count}: {reason}")
    if outcome.failed_examples:
        typer.echo(f"  e.g. items {', '.join(outcome.failed_examples)}")
    if outcome.in_flight_batches:
        typer.echo(f"  {outcome.in_flight_batches} batches still in flight")


def versions(outcome: BackfillSummary) -> None:
    """A collection's versions, one per line, the current one marked."""
    for v in outcome.versions:
        mark = "*" if v.current else " "
        index = "indexed" if v.indexed else "not indexed"
        typer.echo(
            f"{mark} {v.version}\t{v.model}\t{(v.model_file or '?')[:12]}\t{v.state}"
            f"\t{v.done} vectors\t{index}\tjob {v.job_id}"
        )


def job_row(job: Job) -> None:
    """One line of ``embedq jobs``, tab-separated."""
    typer.echo(
        f"{job.id}\t{job.state}\t{job.done_items}/{job.total_items}"
        f"\t{job.failed_items} failed\t{job.model_name}\t{job.queue}"
        f"\t{job.created_at:%Y-%m-%d %H:%M:%S}"
    )


BATCH_STATES = ["done", "sent", "failed", "abandoned"]
"""The order ``embedq job`` counts a job's batches in; other states follow, by name."""


def job_detail(job: Job, batches: dict[str, int], timing: dict[str, float]) -> None:
    """A job's state, counts, batches per state, error and timing."""
    typer.echo(f"job {job.id}: {job.state}, model {job.model_name}, queue {job.queue}")
    typer.echo(f"items: {job.total_items} total, {job.done_items} done, {job.failed_items} failed")
    if batches:
        order = BATCH_STATES
        states = sorted(batches, key=lambda s: (order.index(s) if s in order else 99, s))
        typer.echo("batches: " + ", ".join(f"{batches[s]} {s}" for s in states))
    if job.error:
        typer.echo(f"error: {job.error}")
    typer.echo(", ".join(f"{key} {value:g}" for key, value in timing.items()))


def overdue(batches: Sequence[Batch], count: int, stuck_after: float, sweep: float) -> None:
    """The batches that stopped moving (``count`` of them in all), and what happens to them."""
    now = datetime.now(UTC)
    for batch in batches:
        idle = (now - as_utc(batch.updated_at)).total_seconds()
        last = f", last error: {one_line(batch.last_error)}" if batch.last_error else ""
        typer.echo(
            f"overdue: batch {batch.batch_index} ({batch.item_count} items, no progress for"
            f" {idle:.0f}s, attempts {batch.attempts}, sends {batch.sends}{last})"
        )
    if count > len(batches):
        typer.echo(f"and {count - len(batches)} more")
    if batches:
        typer.echo(
            f"workers re-send lost batches every EMBEDQ_SWEEP_INTERVAL ({sweep:g}s);"
            " `embedq health` fails while any is overdue (no progress for over"
            f" EMBEDQ_STUCK_AFTER, {stuck_after:g}s)"
        )


def prepared_row(row: PreparedModel) -> None:
    """One line of ``embedq models hosts``, tab-separated."""
    typer.echo(
        f"{row.name}\t{row.host}\t{row.state}\t{row.dim or '-'}\t{row.precision or '-'}"
        f"\t{row.updated_at:%Y-%m-%d %H:%M:%S}" + (f"\t{row.error}" if row.error else "")
    )


def manifest_row(manifest: Manifest) -> None:
    """One line of ``embedq models list``, tab-separated."""
    m = manifest
    typer.echo(f"{m.name}\t{m.dim}\t{m.precision}\t{m.source}\t{m.created_at:%Y-%m-%d %H:%M}")


def table(rows: dict[str, str]) -> None:
    """Names and values in two aligned columns, on stderr."""
    width = max(map(len, rows))
    for key, value in rows.items():
        typer.echo(f"{key:>{width}}  {value}", err=True)


def encoded(texts: int, stats: list[EncodeStats], provider: str) -> None:
    """What ``encode`` did: texts, tokens, truncations, time and provider (on stderr)."""
    tokens = sum(s.tokens for s in stats)
    ms = sum(s.total_ms for s in stats)
    typer.echo(
        f"{texts} texts, {tokens} tokens, {sum(s.truncated for s in stats)} truncated,"
        f" {ms:.0f} ms on {provider} ({texts / (ms / 1000):.1f} texts/s)",
        err=True,
    )


def estimate(planned: Estimate) -> None:
    """A dry run's estimate (``tasks.backfill.estimate``) as lines."""
    if planned.current is None:
        into = "a new collection"
    elif planned.version is None:
        into = f"a new version beside version {planned.current}, which readers keep until `use`"
    else:
        into = f"version {planned.version}" + (
            " (the current one)" if planned.version == planned.current else ""
        )
    typer.echo(f"model {planned.model}, into {into}")
    typer.echo(
        f"{planned.rows} rows: {planned.unchanged} unchanged, {planned.new} new,"
        f" {planned.changed} changed, {planned.removed} no longer in the source,"
        f" {planned.duplicates} duplicate ids, {planned.unusable} unusable"
    )
    typer.echo(
        f"to embed: {planned.texts} texts in {planned.batches} batches, {planned.tokens:,} tokens"
        f" ({planned.tokens_by}); {planned.cached} copied from the content cache"
    )
    if planned.seconds is None:
        typer.echo(f"time: unknown ({planned.assumption})")
    else:
        typer.echo(f"time: about {planned.seconds:,.0f} s, at {planned.assumption}")
