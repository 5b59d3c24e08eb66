"""One run of a backfill: the stream of rows settled chunk by chunk against the store, sent as
batches with backpressure, and sealed at the end (see ``tasks.backfill``)."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict

from sqlalchemy.orm import Session, sessionmaker

from storage import (
    backfills,
    batch_stats,
    failed_items,
    jobs,
    ledger,
)
from storage.models import FailureKind
from storage.session import scope, sessions_for
from tasks import names, publishing
from tasks.backfill import cache, versions
from tasks.backfill.chunks import chunks, text_sha
from tasks.backfill.compare import compare
from tasks.backfill.options import (
    REMOVED_SHOWN,
    BackfillError,
    BackfillProgress,
    Limits,
    Options,
    Report,
)
from tasks.backfill.readers import Reader, Row
from tasks.message import BatchMessage
from tasks.publishing import Publisher
from worker.settings import Settings, get_settings

logger = logging.getLogger(__name__)

PRUNE_PAGE = 1000
"""Removed ids deleted per transaction."""


class BackfillRun:
    """One run of a named backfill over a source.

    ``sessions`` is the job store (default: the settings' database) and ``publisher`` sends its
    batches on the bulk queue (default: ``publishing.publisher_for(settings)``, which runs them
    here in local mode); tests hand in their own to run it without a broker.
    """

    poll_s = 0.05
    """Pause between two looks at the ledger while waiting for room."""

    def __init__(
        self,
        reader: Reader,
        options: Options,
        settings: Settings | None = None,
        *,
        sessions: sessionmaker[Session] | None = None,
        publisher: Publisher | None = None,
    ) -> None:
        settings = settings or get_settings()
        self.settings = settings
        self.reader = reader
        self.options = options
        self.limits = Limits.of(options, settings)
        self.sessions = sessions or sessions_for(settings.database_url)
        self.publisher = publisher or publishing.publisher_for(settings)
        self._refreshed = 0.0
        self.in_flight_items: set[str] = set()
        """Items in batches an earlier run left pending (the reconciler sees to them)."""
        self.sent_here: dict[int, list[str]] = {}
        """Items of the batches this run sent that are still pending, by batch index."""
        self.marks = (0, 0)
        """The highest embedding and failed-item row ids when this run started: a row above
        them was written during this run, so meeting its id again is a duplicate."""
        self.seen: set[str] = set()
        """Every id this run met in the source (what the job holds beyond it was removed)."""
        self.version: int | None = None
        """The collection version it syncs, settled when it opens."""
        self.model = options.model or ""
        """The model it embeds with, settled when it opens (``tasks.backfill.versions``)."""
        self.model_file: str | None = None
        """The model file whose vectors the content cache may copy (``tasks.backfill.cache``)."""

    # --- setup -------------------------------------------------------------------------------
    def _open(self, total: int | None) -> BackfillProgress:
        opts = self.options
        recorded = {**asdict(self.limits), "retry_failed": opts.retry_failed}
        source = self.reader.description
        with scope(self.sessions) as session:
            aim = versions.target(session, opts, self.settings)
            self.model, self.model_file = aim.model, aim.model_file
            job_id = aim.job_id or str(uuid.uuid4())
            version = aim.version or 1
            if aim.job_id is None:
                version = backfills.create_version(
                    session,
                    opts.name,
                    job_id=job_id,
                    model=aim.model,
                    queue=names.Queue.BULK,
                    source=source,
                    options=recorded,
                    model_sha256=aim.model_file,
                    indexed=opts.searchable,
                )
            else:
                backfills.resume_backfill(
                    session, opts.name, job_id=job_id, source=source, options=recorded
                )
                self._take_over_batches(session, job_id)
        current = aim.current is None or version == aim.current
        return BackfillProgress(job_id=job_id, total=total, version=version, current=current)

    def _take_over_batches(self, session: Session, job_id: str) -> None:
        """Batches an earlier run left pending: their items are in flight (a lost message is the
        reconciler's to send again), so this run skips them."""
        for batch in ledger.pending_batches(session, job_id):
            self.in_flight_items.update(batch.item_ids)

    # --- the stream --------------------------------------------------------------------------
    def run(self, report: Report | None = None) -> BackfillProgress:
        report = report or (lambda _: None)
        total = self.reader.count()
        progress = self._open(total)
        self.version = progress.version
        if self.options.retry_failed:
            with scope(self.sessions) as session:
                backfills.forget_failures(session, progress.job_id)
        with scope(self.sessions) as session:
            next_index = ledger.next_index(session, progress.job_id)
            self.marks = backfills.highest_row_ids(session)
        limits = self.limits
        for chunk in chunks(self.reader.rows(), limits.batch_size, limits.batch_chars):
            batch = self._settle_chunk(progress, chunk)
            if batch:
                self._wait_for_room(progress, report)
                self._send(progress, next_index, batch)
                next_index += 1
            self._refresh(progress, every=0.5)
            report(progress)
        self._wait_for_room(progress, report, room=1)  # every batch finished
        self._remove_absent(progress)
        self._seal(progress)
        report(progress)
        return progress

    def _settle_chunk(self, progress: BackfillProgress, chunk: list[Row]) -> list[Row]:
        """Record what needs no model (bad rows, unchanged, cached), drop the vectors of changed
        texts, and return the rows to send."""
        job_id, sync = progress.job_id, progress.sync
        ids = [row.item_id for row in chunk]
        self.seen.update(ids)
        with scope(self.sessions) as session:
            stored = backfills.stored_items(session, job_id, ids)
            failed_before = backfills.failed_items(session, job_id, ids)
            # Met before in this run: written since it started, or in a batch it sent.
            seen_here = {i for i, row_id, _ in stored if row_id > self.marks[0]}
            seen_here |= {i for i, row_id in failed_before if row_id > self.marks[1]}
            for items in self.sent_here.values():
                seen_here.update(i for i in items if i in set(ids))
            texts = {i: sha for i, _, sha in stored}
            known = {i for i, _ in failed_before} | self.in_flight_items.intersection(ids)
            found = compare(chunk, texts, known, seen_here)
            progress.duplicates += found.duplicates
            progress.skipped += found.unchanged
            sync.unchanged += found.unchanged
            changed, fresh, failures = found.changed, found.fresh, found.failures
            backfills.forget_items(session, job_id, changed)  # made again below, or failed
            sync.changed += len(changed)
            sync.new += found.new
            failed = sum(
                failed_items.record_failures(session, job_id, items, reason, FailureKind.INPUT)
                for reason, items in failures.items()
            )
            progress.failed_here += failed
            if failed:
                reason = next(iter(failures))
                jobs.add_progress(
                    session, job_id, done=0, failed=failed, error=reason, kind=FailureKind.INPUT
                )
            hashes = {row.item_id: text_sha(row.text) for row in fresh}
            copied = cache.copy_cached(session, job_id, self.model_file, fresh, hashes)
            progress.reused += len(copied.rows)
        reused = {row.item_id for row in copied.rows}
        return [row for row in fresh if row.item_id not in reused]

    def _remove_absent(self, progress: BackfillProgress) -> None:
        """Count the ids the job holds that this run did not meet in the source, and with
        ``prune`` delete what it holds of them (their vectors and failures)."""
        sync = progress.sync
        with scope(self.sessions) as session:
            absent = [
                item
                for item in backfills.held_items(session, progress.job_id)
                if item not in self.seen and item not in self.in_flight_items
            ]
        sync.removed = len(absent)
        sync.removed_examples = absent[:REMOVED_SHOWN]
        if absent and self.options.prune:
            for start in range(0, len(absent), PRUNE_PAGE):
                with scope(self.sessions) as session:
                    page = absent[start : start + PRUNE_PAGE]
                    backfills.forget_items(session, progress.job_id, page)
            sync.pruned = True

    def _wait_for_room(
        self, progress: BackfillProgress, report: Report, room: int | None = None
    ) -> None:
        """Wait until fewer than ``room`` (default: the in-flight bound) batches are unfinished;
        give up with a ``BackfillError`` when nothing finishes for long enough that the
        reconciler would have re-sent a lost batch (twice ``stuck_after`` and a sweep)."""
        room = room or self.limits.max_in_flight
        patience = 2 * self.limits.stuck_after + self.limits.sweep_interval
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
            time.sleep(self.poll_s)

    def _send(self, progress: BackfillProgress, index: int, rows: list[Row]) -> None:
        batch = ledger.NewBatch(
            index=index,
            item_ids=[row.item_id for row in rows],
            texts=[row.text for row in rows],
            positions=[row.position for row in rows],
        )
        with scope(self.sessions) as session:
            ledger.add_batches(session, progress.job_id, [batch])
        self.sent_here[index] = batch.item_ids
        message = BatchMessage.of(progress.job_id, self.model, batch, time.time())
        self.publisher.publish([message], names.Queue.BULK)
        progress.sent += len(rows)
        progress.batches += 1

    def _in_flight(self, progress: BackfillProgress) -> int:
        with scope(self.sessions) as session:
            self._note_pending(progress, ledger.pending_indexes(session, progress.job_id))
        return progress.in_flight

    def _note_pending(self, progress: BackfillProgress, pending: set[int]) -> None:
        """The job's pending batches are ``pending``: count them, forget this run's ended ones."""
        progress.in_flight = len(pending)
        self.sent_here = {i: items for i, items in self.sent_here.items() if i in pending}

    def _refresh(self, progress: BackfillProgress, every: float = 0.0) -> BackfillProgress:
        """Read the job's counts (at most once per ``every`` seconds)."""
        now = time.monotonic()
        if now - self._refreshed < every:
            return progress
        self._refreshed = now
        with scope(self.sessions) as session:
            job = jobs.get_job(session, progress.job_id)
            if job is None:
                raise BackfillError(f"job {progress.job_id} vanished from the store")
            progress.done, progress.failed = job.done_items, job.failed_items
            self._note_pending(progress, ledger.pending_indexes(session, progress.job_id))
            progress.tokens = batch_stats.job_tokens(session, progress.job_id)
        return progress

    def _seal(self, progress: BackfillProgress) -> None:
        """All items are accounted for: fix the total, seal, and settle the state."""
        with scope(self.sessions) as session:
            backfills.seal_job(
                session,
                self.options.name,
                progress.job_id,
                progress.duplicates,
                last_sync=asdict(progress.sync),
            )
            jobs.add_progress(session, progress.job_id, done=0, failed=0, error=None)
        progress.finished = True
        self._refresh(progress)
