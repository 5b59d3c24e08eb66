"""The ``embed`` task: one queue message is one batch of one job (and ``embed_many``: the
batches of one-batch jobs a producer gathered into one message, each ending on its own).

The task is a thin shell over ``tasks.batches.run_message``, which parses the message, claims
the batch in the ledger, embeds it and stores what it made in one transaction; the (job, item)
upsert makes a redelivered batch a no-op, and the claim skips a batch that already ended
without running the model.

Every way out of the task is a recorded outcome (``tasks.failures`` decides which):
- done, or failed with a reason for a permanent error (the items are recorded failed at once);
- sent again with backoff for a transient error, at most ``EMBEDQ_TRANSIENT_RETRIES`` times,
  then failed with the last reason;
- sent again later while its host prepares the batch's model;
- a pool process that dies on the batch: Celery sends it again up to ``EMBEDQ_MAX_RETRIES``
  times, then the worker's parent fails it (``tasks.fleet.step``);
- whatever could not be recorded (the store down for good, the broker down while sending
  again) stays pending in the ledger, where the reconciler finds it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from sqlalchemy.orm import Session, sessionmaker

from tasks import batches, completion, failures, feeder, names, publishing, writing
from tasks.outcomes import Delivery, Outcome
from tasks.preparation import ModelPendingError
from tasks.runtime import Runtime
from worker.app import app
from worker.engine import Progress
from worker.settings import get_settings

logger = logging.getLogger(__name__)


class EmbedTask(Task):  # type: ignore[misc]
    """The task class: its retry bound for lost worker processes is read from the settings when
    Celery asks (after a pool process died), not when this module is imported."""

    @property
    def max_retries(self) -> int:
        return get_settings().max_retries


@app.task(name=names.EMBED, base=EmbedTask, bind=True, ignore_result=True, default_retry_delay=1)  # type: ignore[untyped-decorator]
def embed(self: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """Embed one batch of a job (see ``tasks.message.BatchMessage``) and store the vectors."""
    runtime = Runtime.of(get_settings())

    def run() -> Outcome:
        if runtime.settings.batches_in_flight() > 1:  # the threads pool: through the feeder
            return feeder.run_message(raw, runtime)
        return batches.run_message(raw, runtime, on_progress=_progress_events(self))

    return ended(self, raw, runtime, run, sent_as=self.request.id).summary()


@app.task(name=names.EMBED_MANY, base=EmbedTask, bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def embed_many(self: Any, raws: list[dict[str, Any]]) -> dict[str, Any]:
    """Embed the batches a producer gathered into one message (``tasks.gathering``): together
    through the feeder on the threads pool, one after the other on prefork; each ends as its
    own ``embed`` message would, and one sent again goes alone under its own task id."""
    runtime = Runtime.of(get_settings())
    bodies: list[Any] = raws if isinstance(raws, list) else [raws]
    if runtime.settings.batches_in_flight() > 1:
        results = feeder.run_messages(bodies, runtime)
    else:
        results = [feeder.RUN_ALONE] * len(bodies)
    outcomes = []
    for raw, result in zip(bodies, results, strict=True):

        def run(raw: Any = raw, result: feeder.Ran = result) -> Outcome:
            return feeder.outcome_of(raw, result, runtime)

        outcomes.append(ended(self, raw, runtime, run, sent_as=None, signal=False))
    finished = [(str(o.job_id), o.status) for o in outcomes if o.finished]
    completion.signal_many(runtime.settings.celery_broker(), finished)  # one round trip
    return {"batches": [outcome.summary() for outcome in outcomes]}


def ended(
    task: Any,
    raw: Any,
    runtime: Runtime,
    run: Callable[[], Outcome],
    sent_as: str | None,
    signal: bool = True,
) -> Outcome:
    """``run`` one batch's message, and record how it ended: its job's clients woken when it
    finished the job (unless the caller signals for several at once); sent again while its
    model is prepared; ``after_error`` for the rest."""
    try:
        outcome = run()
    except ModelPendingError as pending:
        # Sent again with a countdown; this message is acknowledged when the task returns, so
        # the batch always has a message. The lost-worker retries are carried over unspent.
        since = raw.get("model_wait_since") or time.time()
        wait = runtime.settings.model_wait_interval
        _send_again(task, {**raw, "model_wait_since": since}, wait, sent_as)
        _note(runtime.sessions, raw, str(pending))  # alive, not overdue
        return Outcome(
            raw.get("job_id"), raw.get("batch_index"), Delivery.WAITING, reason=pending.name
        )
    except Exception as exc:  # every other way out is recorded: see the module's docstring
        return after_error(task, raw, exc, runtime, sent_as)
    if outcome.finished and signal:  # committed: wake whoever waits for this job
        completion.signal(runtime.settings.celery_broker(), str(outcome.job_id), outcome.status)
    return outcome


def after_error(
    task: Any, raw: dict[str, Any], exc: Exception, runtime: Runtime, sent_as: str | None
) -> Outcome:
    """Send the batch again after a transient error (bounded, with backoff), or fail it with
    the reason and its kind; what cannot be recorded is left pending for the reconciler."""
    settings = runtime.settings
    reason = failures.describe(exc)
    counted = raw.get("tries")
    tries = counted if isinstance(counted, int) else 0
    job_id, index = raw.get("job_id"), raw.get("batch_index")
    transient = failures.is_transient(exc)
    if not transient:
        logger.error("batch %s/%s failed: %s", job_id, index, reason, exc_info=exc)
    if transient and tries < settings.transient_retries:
        countdown = failures.backoff(tries, settings)
        try:
            _send_again(task, {**raw, "tries": tries + 1}, countdown, sent_as)
        except Exception as send_exc:  # the broker is gone too
            note = f"{reason}; could not be sent again ({failures.describe(send_exc)})"
            logger.warning("batch %s/%s: %s: left for the reconciler", job_id, index, note)
            _note(runtime.sessions, raw, note)
            return Outcome(job_id, index, Delivery.RETRYING, reason=note)
        logger.warning(
            "batch %s/%s try %d failed (%s); trying again in %.1fs",
            job_id,
            index,
            tries + 1,
            reason,
            countdown,
        )
        _note(runtime.sessions, raw, f"try {tries + 1}: {reason}")
        return Outcome(job_id, index, Delivery.RETRYING, reason=reason)
    final = f"gave up after {tries + 1} tries: {reason}" if transient else reason
    try:
        return batches.fail_raw(runtime.sessions, raw, final, failures.classify(exc))
    except Exception as record_exc:  # the store is down for good: the ledger still says sent
        logger.error(
            "batch %s/%s could not be recorded failed (%s); left for the reconciler",
            job_id,
            index,
            failures.describe(record_exc),
        )
        return Outcome(job_id, index, Delivery.RETRYING, reason=final)


def _send_again(task: Any, raw: dict[str, Any], countdown: float, sent_as: str | None) -> None:
    """This batch's message again, to the queue it came from, under ``sent_as`` (the task id it
    came with) or, for a batch that came with others, its own."""
    delivery = task.request.delivery_info or {}
    publishing.send(
        task.app,
        raw,
        delivery.get("routing_key") or names.Queue.INTERACTIVE,
        countdown=countdown,
        retries=task.request.retries,
        sent_as=sent_as,
    )


def _note(sessions: sessionmaker[Session], raw: dict[str, Any], note: str) -> None:
    """Record on the ledger why a try failed, when the store can be reached."""
    job_id, index = raw.get("job_id"), raw.get("batch_index")
    if isinstance(job_id, str) and isinstance(index, int):
        writing.note(sessions, [(job_id, index)], note)


def _progress_events(task: Any, every_s: float = 1.0) -> Progress:
    """A ``task-progress`` event at most once a second while a batch runs: Flower shows custom
    task events (``update_state`` alone sends none); the job's own progress is in SQL. An event
    that cannot be sent (the broker is away) never fails the batch."""
    last = [time.monotonic()]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s and done < total:
            last[0] = now
            try:
                task.send_event("task-progress", current=done, total=total)
            except Exception as exc:  # a lost event costs nothing; a failed batch would
                logger.debug("task-progress event not sent: %s", exc)

    return report
