"""A backfill's outcome, as ``embedq backfill NAME`` shows it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from storage import backfills, batch_stats, jobs, ledger, model_files
from storage.models import as_utc
from storage.session import scope, sessions_for
from tasks.backfill.options import BackfillError
from worker.errors import InputError


@dataclass(frozen=True)
class WorkerShare:
    """One worker process's part of a backfill."""

    host: str
    pid: int
    texts: int
    batches: int


@dataclass(frozen=True)
class BackfillSummary:
    """A backfill's outcome; ``--json`` prints ``as_json()``."""

    name: str
    job_id: str
    model: str
    source: str
    runs: int
    state: str
    items: int | None
    """All the source's items, once a run has read it to the end (None: not yet)."""
    done: int
    reused: int
    failed: int
    failure_reasons: dict[str, int]
    failed_examples: list[str]
    in_flight_batches: int
    duplicates: int
    wall_s: float | None
    items_per_s: float | None
    workers: list[WorkerShare]
    options: dict[str, object]
    """The limits of the last run (batch size, characters, in flight, stuck after)."""
    model_files: list[str]
    """The sha256 of each model file that made its vectors, the first first."""
    last_sync: dict[str, object] | None
    """What its last whole run found against the store (``tasks.backfill.Sync``): unchanged,
    new, changed and removed ids, whether those were pruned, some removed ids."""

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def summary(database_url: str, name: str, limit: int = 10) -> BackfillSummary:
    """A backfill's outcome: counts, failure reasons, timing, each worker's share, the options
    of its last run and the model files that made its vectors."""
    with scope(sessions_for(database_url)) as session:
        found = backfills.get_backfill(session, name)
        if found is None:
            raise InputError(f"no backfill named {name!r} in the store")
        job = jobs.get_job(session, found.job_id)
        if job is None:
            raise BackfillError(f"the job of backfill {name!r} vanished from the store")
        reasons = backfills.failure_reasons(session, job.id, limit)
        examples = backfills.failed_examples(session, job.id, limit)
        shares = batch_stats.worker_shares(session, job.id)
        stuck = ledger.count_pending(session, job.id)
        started, finished = job.started_at, job.finished_at
        wall = (
            (as_utc(finished) - as_utc(started)).total_seconds() if started and finished else None
        )
        return BackfillSummary(
            name=name,
            job_id=job.id,
            model=job.model_name,
            source=found.source,
            runs=found.runs,
            state=str(job.state),
            items=job.total_items if job.sealed else None,
            done=job.done_items,
            reused=job.reused_items,
            failed=job.failed_items,
            failure_reasons=dict(reasons),
            failed_examples=examples,
            in_flight_batches=stuck,
            duplicates=found.duplicates,
            wall_s=None if wall is None else round(wall, 1),
            items_per_s=round(job.done_items / wall, 1) if wall else None,
            workers=[WorkerShare(*share) for share in shares],
            options=dict(found.options),
            model_files=model_files.model_files(job),
            last_sync=found.last_sync,
        )
