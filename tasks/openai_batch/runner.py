"""Running one batch: validate its input file, embed its requests as a backfill, settle it.

The phases are the batch's status, kept in the store, so whoever runs it next (this process
after an error, another ``serve`` instance after a crash) goes on from the phase reached:

- ``validating``: the file is read line by line; each line is recorded (its custom id, its
  inputs, or why it is rejected), repeated custom ids are rejected in SQL, and the model all
  requests name is checked against the catalog (unknown: the batch fails). A validation cut
  short starts again from the first line (it only writes line rows).
- ``in_progress``: a ``BackfillRun`` named after the batch reads the texts of the accepted lines
  (``InputReader``) and sends them on the bulk queue with the backfill's backpressure, content
  cache and resume: a run started again sends only what is neither stored, failed nor in a
  pending batch, so nothing is lost or embedded twice.
- ``finalizing`` / ``cancelling``: wait until none of the job's batches is in flight, then count
  the requests and end ``completed``, ``expired`` or ``cancelled``.

The run calls ``keep`` between chunks (through the backfill's progress report): it keeps the
batch's request counts on its row for polls to read, renews the batch's lease, and stops the
run (``Stopped``) when the batch is being cancelled or has expired, or when another process
holds the lease now. The backfill needs no hook for this: raising from its report leaves it as
a Ctrl-C does, its batches recorded and resumable. An error the run does not expect ends the
batch ``failed`` with its reason, and its job with it: its pending batches fail and the requests
never sent count failed (``abandon``, called by ``background``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from storage import backfills, batch_failures, jobs, leases, ledger, openai_batches
from storage.models import FailureKind, OpenAIBatch, as_utc
from storage.models import OpenAIBatchStatus as Status
from storage.openai_batches import UNFINISHED
from storage.session import scope
from tasks import backfill, failures
from tasks.openai_batch import output, uploads
from tasks.openai_batch.requests import (
    InputReader,
    Rejected,
    Request,
    check_dimensions,
    lines,
    parse_line,
)
from tasks.openai_batch.shapes import OutputFile
from tasks.publishing import Publisher
from worker.settings import Settings

logger = logging.getLogger(__name__)

RENEW_S = 5.0
"""A runner renews its lease this often at most, and at least three times per lease
(``EMBEDQ_API_BATCH_LEASE``, after which a runner that stopped renewing it, its process dead,
leaves the batch to another process)."""
PAGE = 1000
"""Validated lines written at a time."""
COUNT_EVERY_S, COUNT_SHARE = 1.0, 0.1
"""A runner keeps its batch's request counts on the batch's row (where polls read them) this
often at most, and spends at most this share of its time counting: counting reads every line's
stored texts, so a batch of 200,000 lines (0.25 s a count here) is counted every 2.5 s."""

Catalog = Callable[[], dict[str, int | None]]
"""The models a batch may name, with their dimension when a host has prepared them."""


class Stopped(Exception):
    """Raised to stop a run: the batch is being cancelled, has expired, or is another's now."""


def lease_name(batch_id: str) -> str:
    return f"openai:{batch_id}"


def now() -> datetime:
    return datetime.now(UTC)


class OpenAIBatchRunner:
    """Moves batch ``batch_id`` on from its current phase to a final one (see the module)."""

    poll_s = 0.5

    def __init__(
        self,
        batch_id: str,
        settings: Settings,
        *,
        sessions: sessionmaker[Session],
        catalog: Catalog,
        holder: str,
        publisher: Publisher | None = None,
    ) -> None:
        self.batch_id = batch_id
        self.settings = settings
        self.sessions = sessions
        self.catalog = catalog
        self.holder = holder
        self.publisher = publisher
        self._kept = 0.0
        self._counted = 0.0

    def run(self) -> Status:
        """Drive the batch as far as it goes; returns the status it is left in."""
        status = self._status()
        try:
            if status == Status.VALIDATING:
                status = self.validate()
            if status == Status.IN_PROGRESS:
                status = self.embed()
        except Stopped:
            status = self._status()
        if status in (Status.FINALIZING, Status.CANCELLING):
            status = self.settle(status)
        return status

    # --- phases --------------------------------------------------------------------------------
    def validate(self) -> Status:
        batch = self._batch()
        path = uploads.path_of(self.settings.files_dir, batch.input_file_id)
        if not path.is_file():
            return self._fail("file_missing", f"the input file {batch.input_file_id} is gone")
        with scope(self.sessions) as session:
            openai_batches.clear_requests(session, batch.id)
        models = self.catalog()
        model: str | None = None
        rows: list[dict[str, Any]] = []
        for number, raw in lines(path):
            parsed = parse_line(number, raw, model)
            if isinstance(parsed, Request):
                model = model or parsed.model
                parsed = check_dimensions(parsed, models.get(parsed.model))
            rows.append(self._row(parsed))
            if len(rows) >= PAGE:
                self._write(rows)
        self._write(rows)
        with scope(self.sessions) as session:
            openai_batches.reject_duplicates(
                session, batch.id, "duplicate_custom_id", "an earlier line has this custom_id"
            )
            total, _ = openai_batches.count_inputs(session, batch.id)
        if total == 0:
            return self._fail("empty_file", "the input file holds no line")
        if model is not None and model not in models:
            return self._fail(
                "model_not_found",
                f"the model {model!r} does not exist: no worker host has it and it is not"
                " registered (see GET /v1/models)",
                param="model",
            )
        fields = {"model": model, "total": total, "in_progress_at": now()}
        with scope(self.sessions) as session:
            moved = openai_batches.move_batch(
                session, batch.id, Status.IN_PROGRESS, only_from=[Status.VALIDATING], **fields
            )
        return Status.IN_PROGRESS if moved else self._status()

    def _row(self, parsed: Request | Rejected) -> dict[str, Any]:
        row = {"batch_id": self.batch_id, "line": parsed.line, "custom_id": parsed.custom_id}
        if isinstance(parsed, Rejected):
            return {
                **row,
                "inputs": 0,
                "base64": False,
                "error_code": parsed.code,
                "error": parsed.message,
            }
        return {
            **row,
            "inputs": len(parsed.texts),
            "base64": parsed.base64,
            "error_code": None,
            "error": None,
        }

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            with scope(self.sessions) as session:
                openai_batches.add_requests(session, rows)
            rows.clear()
        self.keep(force=False)

    def embed(self) -> Status:
        batch = self._batch()
        with scope(self.sessions) as session:
            skip = openai_batches.rejected_lines(session, batch.id)
            _, texts = openai_batches.count_inputs(session, batch.id)
        if batch.model is not None and texts:
            path = uploads.path_of(self.settings.files_dir, batch.input_file_id)
            reader = InputReader(path, batch.model, skip, texts)
            options = backfill.Options(name=batch.id, model=batch.model, searchable=False)
            run = backfill.BackfillRun(
                reader, options, self.settings, sessions=self.sessions, publisher=self.publisher
            )
            run.run(lambda _progress: self.keep(force=False))
        with scope(self.sessions) as session:
            openai_batches.move_batch(
                session,
                batch.id,
                Status.FINALIZING,
                only_from=[Status.IN_PROGRESS],
                finalizing_at=now(),
            )
        return self._status()

    def settle(self, status: Status) -> Status:
        """Wait for the batches in flight, then end the batch with its counts."""
        with scope(self.sessions) as session:
            job_id = backfills.job_of(session, self.batch_id)
        while job_id is not None:
            with scope(self.sessions) as session:
                if not ledger.count_pending(session, job_id):
                    break
            self.keep(force=False, stop=False)
            time.sleep(self.poll_s)
        batch = self._batch()
        final = Status.CANCELLED if status == Status.CANCELLING else Status.COMPLETED
        if batch.expired_at is not None and status == Status.FINALIZING:
            final = Status.EXPIRED
        # The files' sizes, as they will be once it ends, so their metadata never reads them.
        output_bytes, error_bytes = output.file_sizes(self.sessions, batch, final)
        with scope(self.sessions) as session:
            total, completed, failed = openai_batches.request_counts(session, batch.id, job_id)
            unfinished = total - completed - failed
            if job_id is not None and final != Status.COMPLETED:  # the run stopped before sealing
                backfills.seal_job(session, batch.id, job_id, 0)
                jobs.add_progress(session, job_id, done=0, failed=0, error=None)
            stamps = {} if final == Status.EXPIRED else {f"{final}_at": now()}
            openai_batches.move_batch(
                session,
                batch.id,
                final,
                only_from=[status],
                total=total,
                completed=completed,
                failed=failed,
                output_file_id=OutputFile(batch.id, False).id if completed else None,
                error_file_id=OutputFile(batch.id, True).id if failed or unfinished else None,
                output_bytes=output_bytes,
                error_bytes=error_bytes,
                **stamps,
            )
        logger.info(
            "batch ended: batch=%s status=%s completed=%d failed=%d",
            batch.id,
            final,
            completed,
            failed,
            extra={"batch": batch.id, "status": final},
        )
        return self._status()

    # --- the lease, cancel and expiry ------------------------------------------------------------
    def keep(self, force: bool = True, stop: bool = True) -> None:
        """Renew the lease (at most every ``RENEW_S``, or a third of the lease, unless
        ``force``); with ``stop``, raise ``Stopped`` when the batch is being cancelled or has
        expired (moved to finalizing). Keeps the batch's counts on its row when due."""
        self._count()
        every = min(RENEW_S, self.settings.api_batch_lease / 3)
        if not force and time.monotonic() - self._kept < every:
            return
        self._kept = time.monotonic()
        expired = False
        with scope(self.sessions) as session:
            held = leases.take_lease(
                session, lease_name(self.batch_id), self.holder, self.settings.api_batch_lease
            )
            batch = openai_batches.get_batch(session, self.batch_id)
            status = None if batch is None else batch.status
            if batch is not None and status in (Status.VALIDATING, Status.IN_PROGRESS):
                expired = now() > as_utc(batch.expires_at)
                if expired:
                    openai_batches.move_batch(
                        session,
                        batch.id,
                        Status.FINALIZING,
                        only_from=[batch.status],
                        finalizing_at=now(),
                        expired_at=now(),
                    )
        if not held:
            raise Stopped(f"batch {self.batch_id} is run by another process now")
        if stop and (expired or status == Status.CANCELLING):
            raise Stopped(f"batch {self.batch_id} is {'expired' if expired else status}")

    def _count(self) -> None:
        if time.monotonic() < self._counted:
            return
        started = time.monotonic()
        with scope(self.sessions) as session:
            job_id = backfills.job_of(session, self.batch_id)
            openai_batches.keep_counts(session, self.batch_id, job_id)
        took = time.monotonic() - started
        self._counted = time.monotonic() + max(COUNT_EVERY_S, took / COUNT_SHARE)

    def abandon(self, exc: BaseException) -> Status:
        """End the batch ``failed`` on an error its run did not expect (a bug, or input no
        check foresaw), with the reason in OpenAI's ``errors``: left as it was, every poll
        started it again into the same error."""
        message = f"the batch stopped on an unexpected error: {failures.describe(exc)}"
        return self._fail("internal_error", message, only_from=UNFINISHED)

    def _batch(self) -> OpenAIBatch:
        with scope(self.sessions) as session:
            batch = openai_batches.get_batch(session, self.batch_id)
        if batch is None:
            raise Stopped(f"batch {self.batch_id} vanished from the store")
        return batch

    def _status(self) -> Status:
        return Status(self._batch().status)

    def _fail(
        self,
        code: str,
        message: str,
        param: str | None = None,
        only_from: Sequence[str] = (Status.VALIDATING,),
    ) -> Status:
        error = {"code": code, "message": message, "param": param, "line": None}
        with scope(self.sessions) as session:
            moved = openai_batches.move_batch(
                session,
                self.batch_id,
                Status.FAILED,
                only_from=only_from,
                errors=[error],
                failed_at=now(),
            )
            job_id = backfills.job_of(session, self.batch_id) if moved else None
            if job_id is not None:  # its job ends with it: nothing will send the rest
                _end_job(session, job_id, message)
        logger.warning("batch failed: batch=%s %s", self.batch_id, message)
        return self._status()


def _end_job(session: Session, job_id: str, reason: str) -> None:
    """End the job of a batch that failed part way: its batches in flight fail (a worker that
    takes one later skips it), and the job is sealed at the items it holds and settled, with
    ``reason``; the requests never sent were never its items."""
    batch_failures.fail_pending(session, job_id, reason, FailureKind.INTERNAL)
    backfills.seal_accounted(session, job_id)
    jobs.add_progress(session, job_id, done=0, failed=0, error=reason, kind=FailureKind.INTERNAL)
