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
    embeddings,
    failed_items,
    jobs,
    ledger,
    model_files,
)
from storage.models import FailureKind
from storage.session import scope, sessions_for
from tasks import names, publishing
from tasks.backfill.chunks import chunks, text_sha
from tasks.backfill.options import BackfillError, BackfillProgress, Limits, Options, Report
from tasks.backfill.readers import Reader, Row
from tasks.message import BatchMessage
from tasks.publishing import Publisher
from worker.settings import Settings, get_settings

logger = logging.getLogger(__name__)


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

    # --- setup -------------------------------------------------------------------------------
    def _open(self, total: int | None) -> BackfillProgress:
        opts = self.options
        recorded = {**asdict(self.limits), "retry_failed": opts.retry_failed}
        source = self.reader.description
        with scope(self.sessions) as session:
            found = backfills.get_backfill(session, opts.name)
            if found is None:
                job_id = str(uuid.uuid4())
                backfills.create_backfill(
                    session,
                    name=opts.name,
                    job_id=job_id,
                    model=opts.model,
                    queue=names.Queue.BULK,
                    source=source,
                    options=recorded,
                )
            else:
                if found.model_name != opts.model:
                    raise BackfillError(
                        f"backfill {opts.name!r} embeds with {found.model_name!r}, not"
                        f" {opts.model!r}: use another name for another model"
                    )
                job_id = found.job_id
                backfills.resume_backfill(session, found, source=source, options=recorded)
                self._take_over_batches(session, job_id)
        return BackfillProgress(job_id=job_id, total=total)

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
        self._seal(progress)
        report(progress)
        return progress

    def _settle_chunk(self, progress: BackfillProgress, chunk: list[Row]) -> list[Row]:
        """Record what needs no model (bad rows, stored, cached) and return the rows to send."""
        job_id, model = progress.job_id, self.options.model
        ids = [row.item_id for row in chunk]
        with scope(self.sessions) as session:
            stored = backfills.stored_items(session, job_id, ids)
            failed_before = backfills.failed_items(session, job_id, ids)
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
                failed_items.record_failures(session, job_id, items, reason, FailureKind.INPUT)
                for reason, items in failures.items()
            )
            progress.failed_here += failed
            hashes = {row.item_id: text_sha(row.text) for row in fresh}
            cached = embeddings.cached_vectors(session, model, list(hashes.values()))
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
            reused = len(embeddings.upsert_embeddings(session, copies))
            progress.reused += reused
            if reused or failed:
                jobs.add_progress(
                    session,
                    job_id,
                    done=reused,
                    failed=failed,
                    error=next(iter(failures), None),
                    kind=FailureKind.INPUT,
                )
                backfills.add_reused(session, job_id, reused)
                sources = {cached[hashes[row.item_id]].job_id for row in reuse}
                self._trace_copies(session, job_id, sources)
        return [row for row in fresh if hashes[row.item_id] not in cached]

    def _trace_copies(self, session: Session, job_id: str, sources: set[str]) -> None:
        """Record the model files that made the vectors copied from the jobs ``sources``."""
        for sha256 in sorted(model_files.files_of_jobs(session, sources)):
            first = model_files.record_model_file(session, job_id, sha256)
            if first is not None:
                logger.warning(
                    "vectors copied from another model file: job=%s file=%s job's file=%s",
                    job_id,
                    sha256,
                    first,
                    extra={"job": job_id, "backfill": self.options.name},
                )

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
        message = BatchMessage.of(progress.job_id, self.options.model, batch, time.time())
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
            backfills.seal_job(session, self.options.name, progress.job_id, progress.duplicates)
            jobs.add_progress(session, progress.job_id, done=0, failed=0, error=None)
        progress.finished = True
        self._refresh(progress)
