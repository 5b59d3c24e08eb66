"""One batch of a job, run and recorded: the plain functions under the ``embed`` task
(``tasks.embed``), which local mode also calls in the submitting process (``tasks.local``).

``run_message`` parses a message, claims its batch in the ledger, embeds it and stores what it
made in one transaction (``embed_batch``, through ``storage.batch_results``; a write the store
refuses for a while is tried again with the vectors kept, ``tasks.writing``); the (job, item)
upsert makes a redelivered batch a no-op, and the claim skips a batch that already ended
without running the model. A message that does not fit what its claim read (its job had
ended, the ledger recorded its batch with other items, it names another model, its positions lie
outside the job: ``BatchMessage.misfit``) never runs, and one the job turns out to have no room
for stores nothing (``jobs.OverfullJobError``): each ends with its reason recorded. A permanent
failure (a malformed message, an unknown or broken model, bad input) is recorded with its reason
and kind (``fail_batch``, ``fail_raw``) and returned; a transient one is raised for the task's
retry policy.

What a run needs from its process comes in a ``tasks.runtime.Runtime``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from storage import batch_failures, batch_results, jobs, ledger
from storage.models import BatchState, FailureKind, JobState
from storage.session import scope
from tasks import outcomes, preparation, writing
from tasks.message import MAX_INTEGER, BatchMessage, Misfit
from tasks.outcomes import Delivery, Outcome
from tasks.runtime import Runtime
from worker import lifecycle, metrics
from worker.engine import Embedder, Encoding, Progress
from worker.errors import (
    InputError,
    ModelError,
    ModelNotFoundError,
    ProviderError,
    TextsRefusedError,
)
from worker.settings import get_settings

logger = logging.getLogger(__name__)


def embed_batch(
    session: Session,
    engine: Embedder,
    message: BatchMessage,
    *,
    provider: str,
    on_progress: Progress | None = None,
    model_sha256: str | None = None,
    host: str | None = None,
) -> Outcome:
    """Embed one batch and store what it made (``storage.batch_results``): vectors, the texts
    the model refused, statistics, the batch's end and the job's progress. ``model_sha256``
    (the ONNX file's, from its manifest) is recorded as the job's model file; ``host`` is the
    machine in the batch's statistics (default: this one)."""
    started = time.time()
    encoded = encode_batch(engine, message, on_progress)
    if isinstance(encoded, str):
        return fail_batch(session, message, encoded, FailureKind.INPUT)
    result, refused = encoded
    return store_encoded(
        session,
        message,
        result,
        refused,
        provider=provider,
        started=started,
        model_sha256=model_sha256,
        host=host,
    )


def store_encoded(
    session: Session,
    message: BatchMessage,
    result: Encoding,
    refused: dict[str, str],
    *,
    provider: str,
    started: float,
    model_sha256: str | None = None,
    host: str | None = None,
) -> Outcome:
    """Store what the engine made of one batch (``result``: its texts but those ``refused``)
    and log it: ``embed_batch``'s second half. ``started`` is when the batch left the queue."""
    finished = outcomes.finished_batch(
        message, result, refused, provider, started, model_sha256, host
    )
    stored = batch_results.store_finished(session, finished)
    return outcomes.stored_outcome(message, finished, stored, provider)


def encode_batch(
    engine: Embedder, message: BatchMessage, on_progress: Progress | None = None
) -> tuple[Encoding, dict[str, str]] | str:
    """The batch's encoding and the items whose text the model refused, with the reason (the
    others are embedded without them); or, when nothing in it can be embedded, why."""
    try:
        return _encode(engine, message, on_progress)
    except InputError as exc:
        return f"batch {message.batch_index}: {exc}"


def _encode(
    engine: Embedder, message: BatchMessage, on_progress: Progress | None
) -> tuple[Encoding, dict[str, str]]:
    try:
        encoding = engine.encode(message.texts, on_progress)
    except TextsRefusedError as exc:
        refused = set(exc.indices)
        if len(refused) == len(message.texts):
            raise
        reason = f"batch {message.batch_index}: {exc.reason}"
        texts = [text for i, text in enumerate(message.texts) if i not in refused]
        result = engine.encode(texts, on_progress)
        metrics.observe_encoded(message.model, len(texts))
        return result, {message.item_ids[i]: reason for i in sorted(refused)}
    metrics.observe_encoded(message.model, len(message.texts))
    return encoding, {}


def fail_batch(session: Session, message: BatchMessage, reason: str, kind: FailureKind) -> Outcome:
    """Record every item of the batch as failed for ``reason`` of ``kind`` (once, however
    often the batch is delivered), end the batch, and count the items in the job."""
    failed, finished = batch_failures.fail_batch(
        session, message.job_id, message.batch_index, message.item_ids, reason, kind
    )
    metrics.observe_failure(message.model, kind, failed)
    logger.warning(
        "batch failed: job=%s batch=%d items=%d reason=%s",
        message.job_id,
        message.batch_index,
        len(message.item_ids),
        reason,
        extra={"job": message.job_id, "batch": message.batch_index, "kind": str(kind)},
    )
    return Outcome(message.job_id, message.batch_index, Delivery.FAILED, finished, reason=reason)


def run_message(
    raw: object, runtime: Runtime | None = None, on_progress: Progress | None = None
) -> Outcome:
    """Parse ``raw``, claim its batch and run it with ``runtime`` (default: this process's).

    Permanent failures (a malformed message, an unknown or broken model, bad input) are recorded
    and returned; transient errors are raised for the caller's retry policy. A model missing on
    this host is prepared from the catalog: in this process in local mode, else by a download
    on this host's queue while ``ModelPendingError`` tells the caller to wait.
    """
    runtime = runtime or Runtime.of(get_settings())
    sessions = runtime.sessions
    try:
        message = BatchMessage.model_validate(raw)
    except ValidationError as exc:
        reason = f"malformed batch: {describe_errors(exc)}"
        return fail_raw(sessions, raw, reason, FailureKind.INPUT)
    try:
        engine = _engine_for(message, runtime)
    except (ModelError, ProviderError) as exc:
        with scope(sessions) as session:
            reason = f"model {message.model}: {exc}"
            return fail_batch(session, message, reason, FailureKind.MODEL)
    with scope(sessions) as session:
        claim = _claim(session, message, runtime.worker)
        if claim.job is None:
            logger.error(
                "dropped batch %d of job %s, which is not in the store",
                message.batch_index,
                message.job_id,
            )
            return Outcome(
                message.job_id, message.batch_index, Delivery.DROPPED, reason="no such job"
            )
        misfit = message.misfit(claim)
        if misfit is not None:
            return _misfit(session, message, claim, *misfit)
        if not claim.claimed:
            return Outcome(
                message.job_id, message.batch_index, Delivery.SKIPPED, reason=claim.state
            )
    started = time.time()
    encoded = encode_batch(engine, message, on_progress)
    if isinstance(encoded, str):
        with scope(sessions) as session:
            return fail_batch(session, message, encoded, FailureKind.INPUT)
    result, refused = encoded
    host = lifecycle.machine_host(runtime.settings)

    def store(session: Session) -> Outcome:
        return store_encoded(
            session,
            message,
            result,
            refused,
            provider=engine.provider,
            started=started,
            model_sha256=engine.model_sha256,
            host=host,
        )

    try:  # a write the store refuses for a while is tried again with the vectors kept
        return writing.keep_writing(
            sessions,
            store,
            runtime.settings,
            started=started,
            batches=[(message.job_id, message.batch_index)],
        )
    except jobs.OverfullJobError as exc:  # rolled back: nothing of the batch was stored
        with scope(sessions) as session:
            return _overfull(session, message, str(exc))


def _claim(session: Session, message: BatchMessage, worker: str) -> ledger.Claim:
    """Claim the message's batch for ``worker``. One the ledger does not know (an application's
    raw message) is recorded as the message carries it, unless its job is missing or has ended;
    when another delivery recorded it first, it is claimed again, to be checked against that
    record."""
    job_id, index = message.job_id, message.batch_index
    claim = ledger.claim(session, job_id, index, worker)
    if claim.state is not None or claim.job is None or claim.job.finished:
        return claim
    if ledger.adopt(session, job_id, index, message.item_ids, worker):
        return replace(claim, state=BatchState.SENT, claimed=True, recorded=message.item_ids)
    return ledger.claim(session, job_id, index, worker)


def _misfit(
    session: Session, message: BatchMessage, claim: ledger.Claim, misfit: Misfit, reason: str
) -> Outcome:
    """How a message that does not fit its job or its ledger record ends (``Misfit``): for a job
    that had ended, refused and recorded in the ledger, nothing counted; with items other than
    its batch's, those items fail (the job could never complete otherwise); else it fails as a
    malformed batch."""
    job_id, index = message.job_id, message.batch_index
    if misfit is Misfit.ENDED:
        batch_failures.refuse(session, job_id, index, message.item_ids, reason)
        logger.error("refused batch %d of job %s, which has ended: %s", index, job_id, reason)
        return Outcome(job_id, index, Delivery.DROPPED, reason=reason)
    if misfit is not Misfit.ITEMS:
        return fail_batch(session, message, reason, FailureKind.INPUT)
    known = set(claim.recorded or ())
    others = [item for item in message.item_ids if item not in known]
    failed, finished = batch_failures.fail_items(session, job_id, others, reason, FailureKind.INPUT)
    logger.warning(
        "batch failed: job=%s batch=%d items=%d reason=%s", job_id, index, failed, reason
    )
    return Outcome(job_id, index, Delivery.FAILED, finished, reason=reason)


def _overfull(session: Session, message: BatchMessage, why: str) -> Outcome:
    """End a batch whose items its job had no room for (``jobs.OverfullJobError``): for a job
    that had ended, the batch is refused and recorded, nothing counted; otherwise the rest of
    the job fails with the reason (which of its items are real cannot be told)."""
    job_id, index = message.job_id, message.batch_index
    reason = f"malformed batch: batch {index} of job {job_id} does not fit its job: {why}"
    status = jobs.job_status(session, job_id)
    if status is None or JobState(status.state).finished:
        batch_failures.refuse(session, job_id, index, message.item_ids, reason)
        logger.error("refused batch %d of job %s, which has ended: %s", index, job_id, reason)
        return Outcome(job_id, index, Delivery.DROPPED, reason=reason)
    finished = batch_failures.close_job(session, job_id, reason, FailureKind.INPUT)
    logger.warning("batch failed: job=%s batch=%d reason=%s", job_id, index, reason)
    return Outcome(job_id, index, Delivery.FAILED, finished, reason=reason)


def _engine_for(message: BatchMessage, runtime: Runtime) -> Embedder:
    settings = runtime.settings
    try:
        return runtime.engines(message.model)
    except ModelNotFoundError:
        if runtime.local:
            preparation.prepare_here(message.model, runtime.sessions, settings)
            return runtime.engines(message.model)
        waited = time.time() - (message.model_wait_since or time.time())
        if waited > settings.download_time_limit + 60:
            raise ModelError(
                f"model {message.model!r} was still not ready on"
                f" {settings.host_name} after {waited:.0f}s"
            ) from None
        preparation.request(message.model, runtime.sessions, settings)
        raise  # unreachable: request raises
    except ModelError as exc:  # present but unusable (corrupt, unreadable): this host says so
        preparation.record_failed(message.model, str(exc), runtime.sessions, settings)
        raise


def fail_raw(
    sessions: sessionmaker[Session], raw: object, reason: str, kind: FailureKind
) -> Outcome:
    """Fail what a message that may not parse stands for: its batch when it names one the
    ledger (or its item ids) can tell, else the rest of its job; a message without a job id
    cannot be recorded anywhere and is dropped with a log line."""
    fields = raw if isinstance(raw, dict) else {}
    job_id, index = fields.get("job_id"), fields.get("batch_index")
    if not (isinstance(job_id, str) and 0 < len(job_id) <= 36 and "\x00" not in job_id):
        logger.error("dropped a batch message without a usable job id: %s", reason)
        return Outcome(None, None, Delivery.DROPPED, reason=reason)
    try:
        message = BatchMessage.model_validate(raw)
    except ValidationError:
        message = None
    with scope(sessions) as session:
        if jobs.get_job(session, job_id) is None:
            logger.error("dropped a batch of job %s, which is not in the store: %s", job_id, reason)
            return Outcome(job_id, None, Delivery.DROPPED, reason=reason)
        if message is not None:
            return fail_batch(session, message, reason, kind)
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index <= MAX_INTEGER:
            found = ledger.get_batch(session, job_id, index)
            if found is not None:
                _, finished = batch_failures.fail_batch(
                    session, job_id, index, found.item_ids, reason, kind
                )
                return Outcome(job_id, index, Delivery.FAILED, finished, reason=reason)
        # Which items it carried cannot be told: the job cannot complete, so it ends here.
        finished = batch_failures.fail_job(session, job_id, reason, kind)
        return Outcome(job_id, None, Delivery.FAILED, finished, reason=reason)


def describe_errors(exc: ValidationError) -> str:
    """Pydantic's errors in one line: where and what, without echoing the (large) input."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
