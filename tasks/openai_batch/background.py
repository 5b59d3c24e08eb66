"""Batches run in background threads of the ``serve`` processes, one runner per batch across
every instance, held by a lease in the store.

Why threads of the API server rather than a Celery task: a batch's runner mostly waits (for
room on the bulk queue, for its last batches), and the workers' processes are for the model;
the serve instances are up whenever a client can ask about a batch. Why a lease: whichever
instance is asked first (at creation, on ``GET /v1/batches/{id}``, or on its first batch
request after a start, which resumes every unfinished batch) takes the batch's lease and runs
it; the others see the lease held and leave it. A runner renews its lease every few seconds,
so when its process dies another instance takes the batch over within
``EMBEDQ_API_BATCH_LEASE`` seconds and resumes it from the store.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from storage import leases, openai_batches
from storage.models import OpenAIBatchStatus
from storage.session import scope
from tasks import failures
from tasks.openai_batch.runner import Catalog, OpenAIBatchRunner, lease_name
from tasks.publishing import Publisher
from worker.settings import Settings

logger = logging.getLogger(__name__)

_threads: dict[str, threading.Thread] = {}
_lock = threading.Lock()
_holders: dict[int, str] = {}
_resumed: set[int] = set()


def holder() -> str:
    """This process's name as a lease holder: host, pid and a nonce (pids are reused)."""
    pid = os.getpid()
    if pid not in _holders:
        _holders[pid] = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"
    return _holders[pid]


def ensure_running(
    batch_id: str,
    settings: Settings,
    *,
    sessions: sessionmaker[Session],
    catalog: Catalog,
    publisher: Publisher | None = None,
) -> bool:
    """Start a runner for ``batch_id`` in this process unless it has ended or a live runner
    (here or in another process) holds it; returns whether one runs here now."""
    with _lock:
        running = _threads.get(batch_id)
        if running is not None and running.is_alive():
            return True
        try:
            with scope(sessions) as session:
                batch = openai_batches.get_batch(session, batch_id)
                if batch is None or OpenAIBatchStatus(batch.status).final:
                    return False
                lease = settings.api_batch_lease
                if not leases.take_lease(session, lease_name(batch_id), holder(), lease):
                    return False
        except IntegrityError:  # another process created the lease row at the same moment
            return False
        runner = OpenAIBatchRunner(
            batch_id,
            settings,
            sessions=sessions,
            catalog=catalog,
            holder=holder(),
            publisher=publisher,
        )
        thread = threading.Thread(
            target=_run, args=(runner,), name=f"batch-{batch_id}", daemon=True
        )
        _threads[batch_id] = thread
        thread.start()
        return True


def _run(runner: OpenAIBatchRunner) -> None:
    try:
        status = runner.run()
        logger.info("batch runner stops: batch=%s status=%s", runner.batch_id, status)
    except Exception as exc:
        if failures.is_transient(exc):  # the store or the broker is out of reach: the batch
            # stays as it is, and the next request about it starts a runner again
            logger.warning(
                "batch runner stops until asked again: batch=%s %s",
                runner.batch_id,
                failures.describe(exc),
            )
        else:  # a bug, or input no check foresaw: run again, it would fail the same way
            logger.exception("batch runner failed: batch=%s", runner.batch_id)
            _abandon(runner, exc)
    finally:
        try:
            with scope(runner.sessions) as session:
                leases.release_lease(session, lease_name(runner.batch_id), runner.holder)
        except SQLAlchemyError:  # the lease expires on its own
            logger.warning("could not release the lease of batch %s", runner.batch_id)


def _abandon(runner: OpenAIBatchRunner, exc: Exception) -> None:
    try:
        runner.abandon(exc)
    except SQLAlchemyError:  # the store went too: the next request starts a runner again
        logger.warning("could not record the failure of batch %s", runner.batch_id)


def resume_all(
    settings: Settings,
    *,
    sessions: sessionmaker[Session],
    catalog: Catalog,
    once: bool = True,
    publisher: Publisher | None = None,
) -> int:
    """Start runners for the unfinished batches no live process holds (with ``once``, only the
    first time this process asks); returns how many started here."""
    with _lock:
        if once and os.getpid() in _resumed:
            return 0
        _resumed.add(os.getpid())
    with scope(sessions) as session:
        unfinished = openai_batches.unfinished_batches(session)
    return sum(
        ensure_running(batch_id, settings, sessions=sessions, catalog=catalog, publisher=publisher)
        for batch_id in unfinished
    )


def wait(batch_id: str, timeout: float | None = None) -> None:
    """Wait for this process's runner of ``batch_id`` to stop (tests)."""
    thread = _threads.get(batch_id)
    if thread is not None:
        thread.join(timeout)
