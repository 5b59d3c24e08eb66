"""The gatherer: one-batch jobs submitted at the same moment in one process (an application's
threads, ``POST /v1/embeddings`` requests) become one transaction and one broker message.

``producer.submit`` hands a job that fits one batch to this process's gatherer and blocks until
it is recorded and sent. The gatherer's thread takes every job waiting (up to ``MAX_JOBS``, and
``EMBEDQ_COALESCE_TEXTS`` texts), writes their job rows and ledger rows in one transaction, and
publishes their batches as one ``embed_many`` message per queue; the worker's feeder runs them
as one engine call and stores them in one transaction, and each job still ends on its own. It
never waits for company: the jobs that arrive while one group commits and publishes make the
next group, so a lone submit costs only a hand-off between threads, and under load the number
of transactions and messages per job falls as the load grows (as TEI and Infinity batch
concurrent requests in their servers).

What a lone submit promises holds for each job: when ``submit`` returns, its rows are committed
and its message is on the broker; when the broker cannot be reached, every job of the group is
recorded failed and each ``submit`` raises ``UnavailableError``; when the store cannot be
written, each raises what the store raised and nothing is sent.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from storage import batch_failures, jobs, ledger
from storage.models import FailureKind, Job
from storage.session import scope, sessions_for
from tasks import names
from tasks.message import BatchMessage
from tasks.publishing import BrokerPublisher
from worker.errors import UnavailableError
from worker.settings import Settings

logger = logging.getLogger(__name__)

MAX_JOBS = 256
"""The most jobs in one transaction and one message."""


@dataclass
class _Submit:
    job: Job
    batch: ledger.NewBatch
    job_id: str
    model: str
    queue: str
    priority: int
    done: Future[None] = field(default_factory=Future)


class Gatherer:
    """This process's gatherer for one store and broker (see the module)."""

    def __init__(self, settings: Settings, publisher: BrokerPublisher) -> None:
        self.url = settings.database_url
        self.publisher = publisher
        self.max_texts = settings.coalesce_texts
        self._inbox: queue.SimpleQueue[_Submit] = queue.SimpleQueue()
        self.groups = 0
        """Transactions written (a test reads how many jobs shared one)."""
        threading.Thread(target=self._loop, name="embedq-gatherer", daemon=True).start()

    def submit(self, job: Job, batch: ledger.NewBatch, priority: int = names.FIRST) -> None:
        """Record ``job`` with its one ``batch`` and send it with ``priority``; returns once
        both are done."""
        request = _Submit(job, batch, job.id, job.model_name, job.queue, priority)
        self._inbox.put(request)
        request.done.result()

    def _loop(self) -> None:
        while True:
            group = self._take()
            try:
                self._record(group)
            except Exception as exc:  # each submit raises what stopped its group
                for request in group:
                    request.done.set_exception(exc)
                continue
            for queue_name, priority in dict.fromkeys((r.queue, r.priority) for r in group):
                same = [r for r in group if (r.queue, r.priority) == (queue_name, priority)]
                self._send(same, queue_name)

    def _take(self) -> list[_Submit]:
        """The submits waiting: the first blocks, the rest are taken as they are."""
        group = [self._inbox.get()]
        texts = len(group[0].batch.texts)
        while len(group) < MAX_JOBS and texts < self.max_texts:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                break
            group.append(request)
            texts += len(request.batch.texts)
        return group

    def _record(self, group: list[_Submit]) -> None:
        # One synchronous commit for the group: when each submit returns, its job is on disk.
        with scope(sessions_for(self.url)) as session:
            jobs.create_jobs(session, [request.job for request in group])
            ledger.add_batches_of(session, [(request.job_id, request.batch) for request in group])
        self.groups += 1

    def _send(self, group: list[_Submit], queue_name: str) -> None:
        now = time.time()
        messages = [BatchMessage.of(r.job_id, r.model, r.batch, now, r.priority) for r in group]
        try:
            self.publisher.publish_together(messages, queue_name)
        except UnavailableError as exc:
            try:
                with scope(sessions_for(self.url)) as session:
                    for request in group:
                        batch_failures.fail_pending(
                            session, request.job_id, f"not enqueued: {exc}", FailureKind.UNAVAILABLE
                        )
            except Exception:  # the store went too: the jobs stay pending for the reconciler
                logger.warning("could not record %d unsent jobs failed", len(group), exc_info=True)
            for request in group:
                request.done.set_exception(exc)
            return
        except Exception as exc:  # a bug here must not leave a submit waiting for ever
            for request in group:
                request.done.set_exception(exc)
            return
        for request in group:
            request.done.set_result(None)


_gatherers: dict[tuple[int, str, int], Gatherer] = {}
_lock = threading.Lock()


def gatherer_for(settings: Settings, publisher: BrokerPublisher) -> Gatherer:
    """This process's gatherer for ``settings``' store and ``publisher``, started on first use
    (after a fork, the child starts its own)."""
    key = (os.getpid(), settings.database_url, id(publisher))
    with _lock:
        if key not in _gatherers:
            _gatherers[key] = Gatherer(settings, publisher)
        return _gatherers[key]
