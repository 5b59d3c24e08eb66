"""The write of what the engine made, tried again where it failed.

When the store refuses a batch's write for a reason that may pass (a full disk, a lock held past
the busy timeout, a connection dropped: ``tasks.failures.is_transient``), the vectors stay in
this process and the same write is tried again after a backoff. Before, the batch went back to
the queue and its model ran again for vectors already made, once per try (on a full disk, 530
model runs in four minutes for 20 batches).

Bounded twice: at most ``EMBEDQ_TRANSIENT_RETRIES`` tries in place, and never past half the
task's hard time limit from when the batch left the queue (a prefork process past its limit is
killed and its batch counted lost). After either, the last error is raised for the task's retry
policy (``tasks.embed.after_error``): sent again, or failed with the reason. A permanent error
is raised at once. Each failed try is noted on the batch's ledger row when the store takes the
note, and counted in ``embedq_write_retries``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from storage import ledger
from storage.session import scope
from tasks import failures
from worker import metrics
from worker.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

BatchKey = tuple[str, int]
"""A batch of a job: (job id, batch index)."""


def keep_writing(
    sessions: sessionmaker[Session],
    write: Callable[[Session], T],
    settings: Settings,
    *,
    started: float,
    batches: Sequence[BatchKey],
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``write`` in a transaction of its own, tried again in place after a transient error (see
    the module); ``started`` is when the first of ``batches`` left the queue (``time.time()``)."""
    tries = 0
    while True:
        try:
            with scope(sessions) as session:
                return write(session)
        except Exception as exc:
            if not failures.is_transient(exc) or tries >= settings.transient_retries:
                raise
            pause = failures.backoff(tries, settings)
            if time.time() + pause - started > settings.task_time_limit / 2:
                raise
            tries += 1
            reason = failures.describe(exc)
            logger.warning(
                "write of %d batches failed (try %d: %s): vectors kept, writing again in %.1fs",
                len(batches),
                tries,
                reason,
                pause,
                extra={"batches": len(batches), "try": tries},
            )
            metrics.observe_write_retry(len(batches))
            note(sessions, batches, f"write try {tries}: {reason}")
            sleep(pause)


def note(sessions: sessionmaker[Session], batches: Sequence[BatchKey], why: str) -> None:
    """Record on the batches' ledger rows why a try failed, when the store can be reached (a
    batch that made progress is not overdue)."""
    try:
        with scope(sessions) as session:
            for job_id, index in batches:
                ledger.note_error(session, job_id, index, why)
    except Exception:  # the store is what failed; the caller's log line says why
        logger.debug("could not note the error of %d batches", len(batches), exc_info=True)
