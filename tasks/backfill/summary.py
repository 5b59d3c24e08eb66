"""A backfill's outcome, as ``embedq backfill NAME`` shows it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqlalchemy.orm import Session

from storage import backfills, batch_stats, collections, jobs, ledger, model_files
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
class VersionInfo:
    """One version of a backfill's collection, as ``embedq collection NAME`` lists it."""

    version: int
    model: str
    model_file: str | None
    job_id: str
    state: str
    done: int
    current: bool
    indexed: bool
    """Whether its vectors are also in a vector index (pgvector, sqlite-vec)."""


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
    version: int
    """The collection version this summary is of."""
    versions: list[VersionInfo]

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def summary(
    database_url: str, name: str, limit: int = 10, version: int | None = None
) -> BackfillSummary:
    """A backfill's outcome: counts, failure reasons, timing, each worker's share, the options
    of its last run and the model files that made its vectors; of its current version, or of
    ``version``."""
    with scope(sessions_for(database_url)) as session:
        found = backfills.get_backfill(session, name)
        if found is None:
            raise InputError(f"no backfill named {name!r} in the store")
        listed = versions_of(session, name, found.job_id)
        wanted = [v for v in listed if (v.current if version is None else v.version == version)]
        if version is not None and not wanted:
            raise InputError(f"backfill {name!r} has no version {version}")
        shown = wanted[0] if wanted else None
        job = jobs.get_job(session, found.job_id if shown is None else shown.job_id)
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
            version=1 if shown is None else shown.version,
            versions=listed,
        )


def versions_of(session: Session, name: str, current_job: str) -> list[VersionInfo]:
    """The versions of collection ``name``, oldest first."""
    listed = []
    for version in collections.list_versions(session, name):
        job = jobs.get_job(session, version.job_id)
        listed.append(
            VersionInfo(
                version=version.version,
                model=version.model_name,
                model_file=collections.file_of(session, version),
                job_id=version.job_id,
                state="" if job is None else str(job.state),
                done=0 if job is None else job.done_items,
                current=version.job_id == current_job,
                indexed=version.index_table is not None,
            )
        )
    return listed
