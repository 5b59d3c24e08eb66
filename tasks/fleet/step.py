"""What every worker does for the fleet besides running tasks, as one Celery bootstep in the
worker's parent process (``worker.app`` adds it by name):

- records a batch failed when its pool process died on it more often than
  ``EMBEDQ_MAX_RETRIES`` allows, or when it ran past the hard time limit: Celery reports both in
  the parent (``task_failure``), where the dead child can no longer write anything;
- runs the reconciler every ``EMBEDQ_SWEEP_INTERVAL`` seconds in a thread (one sweep at a time
  across the fleet, by a lease in the store), so lost messages are re-published with no extra
  process to deploy;
- records this host's prepared models once the worker is up.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import Task, bootsteps
from celery.signals import task_failure

from storage import leases
from storage.models import FailureKind
from storage.session import scope
from tasks import completion, names, preparation
from tasks.batches import fail_raw
from tasks.fleet.broker import redis_presence, redis_release
from tasks.fleet.reconciler import Reconciler, alive_ttl
from tasks.publishing import BrokerPublisher
from worker import lifecycle, metrics
from worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from celery.worker import WorkController

logger = logging.getLogger(__name__)


def record_lost(
    sender: Task | None, exception: BaseException, args: Sequence[Any] | None = None, **_: object
) -> None:
    """``task_failure`` in the worker's parent: end the batches its pool process could not
    (one, or each of an ``embed_many`` message's)."""
    if sender is None or sender.name not in (names.EMBED, names.EMBED_MANY):
        return
    if isinstance(exception, WorkerLostError):
        deaths = getattr(sender.request, "retries", 0) + 1
        reason = f"worker process died {deaths} times on this batch ({exception})"
    elif isinstance(exception, TimeLimitExceeded):
        reason = f"the batch ran past the hard time limit ({exception}s) and was stopped"
    else:
        return  # the task itself recorded every other failure
    raw = args[0] if args else None
    bodies = raw if sender.name == names.EMBED_MANY and isinstance(raw, list) else [raw]
    for body in bodies:
        try:
            outcome = fail_raw(lifecycle.get_sessions(), body, reason, FailureKind.WORKER)
        except Exception as exc:  # the store is away: the ledger still says sent
            logger.error("could not record a lost batch (%s): left for the reconciler", exc)
            continue
        metrics.observe_reconciled("worker_lost", 1)
        if outcome.finished and outcome.job_id:
            completion.signal(get_settings().celery_broker(), outcome.job_id)


class ReconcilerThread(threading.Thread):
    """Says this worker is alive and sweeps the ledger every interval until stopped; a failed
    sweep is logged and retried."""

    @staticmethod
    def keep_alive(me: str, settings: Settings) -> None:
        try:
            with scope(lifecycle.get_sessions()) as session:
                leases.keep_alive(session, me, alive_ttl(settings))
        except Exception:  # the store is away: the lease lapses, the next interval renews it
            logger.warning("could not renew this worker's alive lease", exc_info=True)

    def __init__(self) -> None:
        super().__init__(name="embedq-reconciler", daemon=True)
        self.stopping = threading.Event()

    def run(self) -> None:
        settings = get_settings()
        broker = settings.celery_broker()
        on_redis = broker.startswith(("redis://", "rediss://"))
        me = lifecycle.process_name(settings)
        publisher = BrokerPublisher(settings)  # on connections of this thread's own
        reconciler = Reconciler(
            settings,
            lifecycle.get_sessions(),
            publisher,
            redis_presence(broker) if on_redis else None,
            holder=me,
            release=redis_release(broker) if on_redis else None,
        )
        self.keep_alive(me, settings)
        # Workers started together spread their sweeps over the interval.
        pause = random.uniform(0, settings.sweep_interval)
        while not self.stopping.wait(pause):
            pause = settings.sweep_interval
            self.keep_alive(me, settings)
            try:
                report = reconciler.sweep()
            except Exception:  # the store or broker is away: the next sweep tries again
                logger.warning("reconciler sweep failed", exc_info=True)
                continue
            metrics.observe_reconciled("republished", report.republished)
            metrics.observe_reconciled("failed", report.failed)
            for job_id in report.finished_jobs:
                completion.signal(broker, job_id)


class FleetStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """The worker's fleet duties: lost-batch records, the reconciler, this host's models."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: WorkController, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.thread: ReconcilerThread | None = None

    def start(self, parent: WorkController) -> None:
        task_failure.connect(record_lost, weak=False)
        preparation.report_models(get_settings())
        self.thread = ReconcilerThread()
        self.thread.start()

    def stop(self, parent: WorkController) -> None:
        if self.thread is not None:
            self.thread.stopping.set()
            self.thread.join(timeout=5)
            self.thread = None
