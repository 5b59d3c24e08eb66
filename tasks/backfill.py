"""Bulk backfills: a named, resumable job fed from a streamed source, with backpressure.

``run`` reads the source row by row and, per chunk of rows:
- skips items already stored in the job, already failed (unless retrying them), or in a batch
  still in flight from an earlier run;
- copies the vector of any text the content cache already holds for the model (counted as
  reused; the model does not run);
- records unusable rows (no id, no text, empty text) as failed items with their reason;
- sends the rest as one ``bulk`` batch, recorded in the batch ledger with its items and texts,
  after waiting until fewer than ``max_in_flight`` of the job's batches are unfinished.
The producer therefore holds one chunk and Redis at most ``max_in_flight`` messages of the job,
whatever the source's size. At the end it waits for the batches in flight, then seals the job
(its total is the items accounted for) so its state settles.

Batches are the same ledger rows every job has: a batch whose message is lost is re-published
by the reconciler in the workers (and failed after too many losses), so a resumed run (the same
name again) sends only what no batch holds: items neither stored, failed nor in a pending batch.
A publish that fails (the broker is down) stops the run with ``UnavailableError``; its batch is
already in the ledger, so the reconciler or the next run picks it up.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage import ledger, repository
from storage.models import (
    Backfill,
    BatchStat,
    Embedding,
    FailedItem,
    Job,
    as_utc,
)
from storage.session import scope, sessions_for
from tasks import names
from tasks.message import BatchMessage
from tasks.readers import Reader, Row
from worker.errors import EmbedqError, InputError
from worker.settings import Settings, get_settings


class BackfillError(EmbedqError):
    """A backfill that cannot start or go on (a different model under the same name, ...)."""


@dataclass
class Options:
    name: str
    model: str
    batch_size: int = 128
    batch_chars: int = 128 * 2000
    max_in_flight: int = 8
    stuck_after: float = 300.0
    retry_failed: bool = False


@dataclass
class Progress:
    """What the producer knows now; the CLI draws it."""

    job_id: str
    total: int | None
    sent: int = 0
    reused: int = 0
    failed_here: int = 0
    skipped: int = 0
    """Items already stored, failed or in a pending batch when this run met them."""
    duplicates: int = 0
    """Rows whose id this run had already met (repeated in the source): skipped."""
    batches: int = 0
    done: int = 0
    failed: int = 0
    tokens: int = 0
    in_flight: int = 0
    finished: bool = False


Report = Callable[[Progress], None]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _chunks(rows: Iterator[Row], size: int, chars: int, window: int = 8) -> Iterator[list[Row]]:
    """Batches of at most ``size`` rows and ``chars`` characters. Rows are taken a window of
    ``window`` batches at a time and sorted by length within it, so each batch pads little (as
    the producer does for a job); memory stays one window."""
    pending: list[Row] = []
    budget = 0
    for row in rows:
        pending.append(row)
        budget += len(row.text)
        if len(pending) >= size * window or budget >= chars * window:
            yield from _cut(pending, size, chars)
            pending, budget = [], 0
    yield from _cut(pending, size, chars)


def _cut(rows: list[Row], size: int, chars: int) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    budget = 0
    for row in sorted(rows, key=lambda r: len(r.text)):
        chunk.append(row)
        budget += len(row.text)
        if len(chunk) >= size or budget >= chars:
            yield chunk
            chunk, budget = [], 0
    if chunk:
        yield chunk


class BackfillRun:
    """One run of a named backfill over a source."""

    def __init__(self, reader: Reader, options: Options, settings: Settings | None = None):
        self.reader = reader
        self.options = options
        self.settings = settings or get_settings()
        self.sessions: sessionmaker[Session] = sessions_for(self.settings.database_url)
        self._refreshed = 0.0
        self.in_flight_items: set[str] = set()
        """Items in batches an earlier run left pending (the reconciler sees to them)."""
        self.sent_here: dict[int, list[str]] = {}
        """Items of the batches this run sent that are still pending, by batch index."""
        self.marks = (0, 0)
        """The highest embedding and failed-item row ids when this run started: a row above
        them was written during this run, so meeting its id again is a duplicate."""

    # --- setup -------------------------------------------------------------------------------
    def _open(self, total: int | None) -> Progress:
        opts = self.options
        with scope(self.sessions) as session:
            found = session.get(Backfill, opts.name)
            if found is None:
                job_id = str(uuid.uuid4())
                session.add(
                    Job(
                        id=job_id,
                        model_name=opts.model,
                        queue=names.Queue.BULK,
                        tag=opts.name,
                        total_items=0,
                        sealed=False,
                        meta={"backfill": opts.name, "source": self.reader.description},
                    )
                )
                session.flush()
                session.add(
                    Backfill(
                        name=opts.name,
                        job_id=job_id,
                        model_name=opts.model,
                        source=self.reader.description,
                        runs=1,
                    )
                )
            else:
                if found.model_name != opts.model:
                    raise BackfillError(
                        f"backfill {opts.name!r} embeds with {found.model_name!r}, not"
                        f" {opts.model!r}: use another name for another model"
                    )
                job_id = found.job_id
                found.runs += 1
                found.source = self.reader.description
                session.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(sealed=False, finished_at=None, state="running")
                )
                self._take_over_batches(session, job_id)
        return Progress(job_id=job_id, total=total)

    def _take_over_batches(self, session: Session, job_id: str) -> None:
        """Batches an earlier run left pending: their items are in flight (a lost message is the
        reconciler's to send again), so this run skips them."""
        for batch in ledger.pending_batches(session, job_id):
            self.in_flight_items.update(batch.item_ids)

    # --- the stream --------------------------------------------------------------------------
    def run(self, report: Report | None = None) -> Progress:
        report = report or (lambda _: None)
        total = self.reader.count()
        progress = self._open(total)
        if self.options.retry_failed:
            self._forget_failures(progress.job_id)
        with scope(self.sessions) as session:
            next_index = ledger.next_index(session, progress.job_id)
            self.marks = (
                int(session.scalar(select(func.coalesce(func.max(Embedding.id), 0))) or 0),
                int(session.scalar(select(func.coalesce(func.max(FailedItem.id), 0))) or 0),
            )
        for chunk in _chunks(self.reader.rows(), self.options.batch_size, self.options.batch_chars):
            batch = self._settle_chunk(progress, chunk)
            if batch:
                self._wait_for_room(progress, report)
                self._send(progress, next_index, batch)
                next_index += 1
            self._refresh(progress, every=0.5)
            report(progress)
        self._wait_for_room(progress, report, room=1)  # every batch finished
        self._seal(progress)
        report(progress)
        return progress

    def _forget_failures(self, job_id: str) -> None:
        with scope(self.sessions) as session:
            result: Any = session.execute(delete(FailedItem).where(FailedItem.job_id == job_id))
            forgotten = int(result.rowcount)
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(failed_items=Job.failed_items - forgotten, error=None)
            )

    def _settle_chunk(self, progress: Progress, chunk: list[Row]) -> list[Row]:
        """Record what needs no model (bad rows, stored, cached) and return the rows to send."""
        job_id, model = progress.job_id, self.options.model
        ids = [row.item_id for row in chunk]
        with scope(self.sessions) as session:
            stored = session.execute(
                select(Embedding.item_id, Embedding.id).where(
                    Embedding.job_id == job_id, Embedding.item_id.in_(ids)
                )
            ).all()
            failed_before = session.execute(
                select(FailedItem.item_id, FailedItem.id).where(
                    FailedItem.job_id == job_id, FailedItem.item_id.in_(ids)
                )
            ).all()
            # Met before in this run: written since it started, or in a batch it sent.
            seen_here = {i for i, row_id in stored if row_id > self.marks[0]}
            seen_here |= {i for i, row_id in failed_before if row_id > self.marks[1]}
            for items in self.sent_here.values():
                seen_here.update(i for i in items if i in set(ids))
            known = {i for i, _ in stored} | {i for i, _ in failed_before}
            known |= self.in_flight_items.intersection(ids)
            fresh: list[Row] = []
            failures: dict[str, list[str]] = {}
            for row in chunk:
                if row.item_id in seen_here:
                    progress.duplicates += 1
                    continue
                if row.item_id in known:
                    progress.skipped += 1
                    continue
                seen_here.add(row.item_id)  # a repeated id later in this chunk is a duplicate
                problem = row.problem or (
                    "empty or whitespace-only text" if not row.text.strip() else None
                )
                if problem:
                    failures.setdefault(problem, []).append(row.item_id)
                else:
                    fresh.append(row)
            failed = sum(
                repository.record_failures(session, job_id, items, reason)
                for reason, items in failures.items()
            )
            progress.failed_here += failed
            hashes = {row.item_id: _sha(row.text) for row in fresh}
            cached = repository.cached_vectors(session, model, list(hashes.values()))
            reuse = [row for row in fresh if hashes[row.item_id] in cached]
            copies = [
                {
                    "job_id": job_id,
                    "item_id": row.item_id,
                    "position": row.position,
                    "text_sha256": hashes[row.item_id],
                    "dim": cached[hashes[row.item_id]].dim,
                    "vector": cached[hashes[row.item_id]].vector,
                    "token_count": cached[hashes[row.item_id]].token_count,
                    "truncated": cached[hashes[row.item_id]].truncated,
                }
                for row in reuse
            ]
            reused = len(repository.upsert_embeddings(session, copies))
            progress.reused += reused
            if reused or failed:
                repository.add_progress(
                    session,
                    job_id,
                    done=reused,
                    failed=failed,
                    error=next(iter(failures), None),
                )
                session.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(reused_items=Job.reused_items + reused)
                )
        return [row for row in fresh if hashes[row.item_id] not in cached]

    def _wait_for_room(self, progress: Progress, report: Report, room: int | None = None) -> None:
        """Wait until fewer than ``room`` (default: the in-flight bound) batches are unfinished;
        give up with a ``BackfillError`` when nothing finishes for long enough that the
        reconciler would have re-sent a lost batch (twice ``stuck_after`` and a sweep)."""
        room = room or self.options.max_in_flight
        patience = 2 * self.options.stuck_after + self.settings.sweep_interval
        seen, since = (progress.done, progress.failed), time.monotonic()
        while self._in_flight(progress) >= room:
            self._refresh(progress, every=0.5)
            report(progress)
            if (progress.done, progress.failed) != seen:
                seen, since = (progress.done, progress.failed), time.monotonic()
            elif time.monotonic() - since > patience:
                raise BackfillError(
                    f"{progress.in_flight} batches of backfill {self.options.name!r} are in"
                    f" flight and none finished for {patience:.0f}s: is a worker consuming the"
                    " bulk queue? (workers re-send batches whose message was lost.) Run the"
                    " backfill again to go on."
                )
            time.sleep(0.05)

    def _send(self, progress: Progress, index: int, rows: list[Row]) -> None:
        from tasks.producer import message_for, publish

        batch = ledger.NewBatch(
            index=index,
            item_ids=[row.item_id for row in rows],
            texts=[row.text for row in rows],
            positions=[row.position for row in rows],
        )
        with scope(self.sessions) as session:
            ledger.add_batches(session, progress.job_id, [batch])
        self.sent_here[index] = batch.item_ids
        message: BatchMessage = message_for(progress.job_id, self.options.model, batch, time.time())
        publish([message], names.Queue.BULK)
        progress.sent += len(rows)
        progress.batches += 1

    def _in_flight(self, progress: Progress) -> int:
        with scope(self.sessions) as session:
            progress.in_flight = ledger.count_pending(session, progress.job_id)
        return progress.in_flight

    def _refresh(self, progress: Progress, every: float = 0.0) -> Progress:
        """Read the job's counts (at most once per ``every`` seconds)."""
        now = time.monotonic()
        if now - self._refreshed < every:
            return progress
        self._refreshed = now
        with scope(self.sessions) as session:
            job = session.get(Job, progress.job_id)
            if job is None:
                raise BackfillError(f"job {progress.job_id} vanished from the store")
            progress.done, progress.failed = job.done_items, job.failed_items
            pending = ledger.pending_indexes(session, progress.job_id)
            progress.in_flight = len(pending)
            self.sent_here = {i: items for i, items in self.sent_here.items() if i in pending}
            progress.tokens = int(
                session.scalar(
                    select(func.coalesce(func.sum(BatchStat.tokens), 0)).where(
                        BatchStat.job_id == progress.job_id
                    )
                )
                or 0
            )
        return progress

    def _seal(self, progress: Progress) -> None:
        """All items are accounted for: fix the total, seal, and settle the state."""
        with scope(self.sessions) as session:
            job = session.get(Job, progress.job_id)
            assert job is not None
            job.total_items = job.done_items + job.failed_items
            job.sealed = True
            found = session.get(Backfill, self.options.name)
            if found is not None:
                found.duplicates = progress.duplicates
            session.flush()
            repository.add_progress(session, progress.job_id, done=0, failed=0, error=None)
        progress.finished = True
        self._refresh(progress)


def summary(database_url: str, name: str, limit: int = 10) -> dict[str, Any]:
    """A backfill's outcome: counts, failure reasons, timing, each worker's share."""
    with scope(sessions_for(database_url)) as session:
        found = session.get(Backfill, name)
        if found is None:
            raise InputError(f"no backfill named {name!r} in the store")
        job = session.get(Job, found.job_id)
        assert job is not None
        reasons = session.execute(
            select(FailedItem.reason, func.count())
            .where(FailedItem.job_id == job.id)
            .group_by(FailedItem.reason)
            .order_by(func.count().desc())
            .limit(limit)
        ).all()
        examples = session.scalars(
            select(FailedItem.item_id).where(FailedItem.job_id == job.id).limit(limit)
        ).all()
        shares = session.execute(
            select(BatchStat.host, BatchStat.pid, func.sum(BatchStat.texts), func.count())
            .where(BatchStat.job_id == job.id)
            .group_by(BatchStat.host, BatchStat.pid)
            .order_by(func.sum(BatchStat.texts).desc())
        ).all()
        stuck = ledger.count_pending(session, job.id)
        started, finished = job.started_at, job.finished_at
        wall = (
            (as_utc(finished) - as_utc(started)).total_seconds() if started and finished else None
        )
        return {
            "name": name,
            "job_id": job.id,
            "model": job.model_name,
            "source": found.source,
            "runs": found.runs,
            "state": str(job.state),
            "items": job.total_items if job.sealed else None,
            "done": job.done_items,
            "reused": job.reused_items,
            "failed": job.failed_items,
            "failure_reasons": {reason: count for reason, count in reasons},
            "failed_examples": list(examples),
            "in_flight_batches": stuck,
            "duplicates": found.duplicates,
            "wall_s": None if wall is None else round(wall, 1),
            "items_per_s": round(job.done_items / wall, 1) if wall else None,
            "workers": [
                {"host": host, "pid": pid, "texts": int(texts), "batches": int(batches)}
                for host, pid, texts, batches in shares
            ],
        }
