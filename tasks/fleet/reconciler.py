"""The reconciler: finds batches whose message the broker lost and publishes them again.

A batch is *overdue* when the ledger has seen no progress on it (sent, started, retried,
re-published) for ``EMBEDQ_STUCK_AFTER`` seconds. That alone does not mean its message is
lost: it may wait behind a deep queue, or run long. So the reconciler asks the broker (on Redis:
the queue lists, their priority sub-lists and the hash of unacknowledged messages, looked up by
the batch's deterministic task id) and acts only on batches whose message is nowhere, twice in a
row a moment apart (a message is briefly in neither place while a worker takes it):
- re-published, with one more ``sends``, when the ledger still holds its texts and it was sent
  fewer than ``1 + EMBEDQ_MAX_RETRIES`` times;
- failed with the reason otherwise, so nothing cycles forever.
Re-publishing is safe: writes are idempotent per (job, item), and a worker skips a batch that
already ended. On a broker other than Redis the broker cannot be asked; every overdue batch is
then treated as lost (a duplicate message costs a ledger lookup, not a second inference).

Every worker runs a sweep every ``EMBEDQ_SWEEP_INTERVAL`` seconds (``tasks.fleet.step``); a
lease row in the store lets one of them sweep at a time across the fleet.

**Dead workers.** A worker killed outright (``docker kill``, a lost host) leaves the batches it
ran among Redis's unacknowledged messages, which Redis hands out again only after the visibility
timeout (by default 31 minutes). Each worker process says it is alive with a lease renewed every
sweep (``leases.keep_alive``). A batch claimed on a machine that has said so before and where no
worker process says so any more is its worker's orphan: the sweep takes its message out of the
unacknowledged ones (so Redis will not hand it out later as well) and re-publishes it, the same
way as a lost one. A machine that never said so (a worker of an older version) is left to the
visibility timeout, and on a machine where another worker process still lives (one host, two
workers) so is a dead one's batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage import batch_failures, jobs, leases, ledger, stalled
from storage.models import BatchState, FailureKind, as_utc
from storage.session import scope
from tasks.fleet.broker import Presence, Release
from tasks.message import BatchMessage, task_id
from tasks.publishing import Publisher
from worker.settings import Settings

logger = logging.getLogger(__name__)

LEASE = "reconciler"
Clock = Callable[[], datetime]
"""The present, as the reconciler judges what is overdue (tests hand in a later one)."""
FORGET_S = 86400.0
"""Alive leases expired longer ago than this are deleted."""
Overdue = tuple[int, str, int, datetime]
"""An overdue batch as a sweep found it: its row id, job, index and last progress."""


@dataclass
class Sweep:
    """What one sweep found and did."""

    swept: bool = False
    """False when another worker held the lease."""
    overdue: int = 0
    on_broker: int = 0
    orphaned: int = 0
    """Batches claimed on a machine whose workers stopped saying they are alive."""
    republished: int = 0
    failed: int = 0
    finished_jobs: tuple[str, ...] = ()


class Reconciler:
    """One worker's reconciler; ``sweep`` is called periodically (and by tests directly)."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        publisher: Publisher,
        presence: Presence | None,
        holder: str,
        recheck_after_s: float = 0.5,
        release: Release | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.publisher = publisher
        self.clock = clock or (lambda: datetime.now(UTC))
        self.presence = presence
        self.holder = holder
        self.recheck_after_s = recheck_after_s
        self.release = release

    def sweep(self, limit: int = 500) -> Sweep:
        report = Sweep()
        if not self._lease():
            return report
        report.swept = True
        finished: list[str] = []
        for batch_id, job_id, index, seen in self._orphans(limit):
            report.orphaned += 1
            action, done_job = self._settle(batch_id, job_id, index, seen, ORPHANED)
            report.republished += action == "republished"
            report.failed += action == "failed"
            finished += [job_id] if done_job else []
        with scope(self.sessions) as session:
            overdue = [
                (b.id, b.job_id, b.batch_index, as_utc(b.updated_at))
                for b in stalled.overdue_batches(
                    session, self.settings.stuck_after, limit=limit, now=self.clock()
                )
            ]
        report.overdue = len(overdue)
        if not overdue:
            report.finished_jobs = tuple(finished)
            self._log(report)
            return report
        lost = self._absent(overdue)
        if lost and self.presence is not None:  # a message may be between list and hash
            time.sleep(self.recheck_after_s)
            lost = self._absent(lost)
        report.on_broker = len(overdue) - len(lost)
        for batch_id, job_id, index, seen in lost:
            action, done_job = self._settle(batch_id, job_id, index, seen, LOST)
            report.republished += action == "republished"
            report.failed += action == "failed"
            finished += [job_id] if done_job else []
        report.finished_jobs = tuple(finished)
        self._log(report)
        return report

    def _log(self, report: Sweep) -> None:
        if report.republished or report.failed:
            logger.warning(
                "reconciler: %d batches of dead workers, %d overdue batches, %d still on the"
                " broker, %d re-published, %d failed",
                report.orphaned,
                report.overdue,
                report.on_broker,
                report.republished,
                report.failed,
                extra={"action": "reconcile", **{k: getattr(report, k) for k in _COUNTS}},
            )

    def _orphans(self, limit: int) -> list[Overdue]:
        """Claimed batches whose machine's workers stopped saying they are alive, taken out of
        the broker's unacknowledged messages; those whose message is still queued are left."""
        if self.release is None or self.presence is None:
            return []
        now = self.clock()
        with scope(self.sessions) as session:
            known = leases.machines(session, FORGET_S, now)
            orphans = [
                (b.id, b.job_id, b.batch_index, as_utc(b.updated_at))
                for b in stalled.claimed_batches(session, alive_ttl(self.settings), limit, now)
                if known.get((b.worker or "").rsplit(":", 1)[0]) is False
            ]
        if not orphans:
            return []
        ids = {task_id(job, index) for _, job, index, _ in orphans}
        released = self.release(ids)
        held = self.presence(ids - released)
        return [b for b in orphans if task_id(b[1], b[2]) not in held]

    def _lease(self) -> bool:
        ttl = max(3 * self.settings.sweep_interval, 30.0)
        try:
            with scope(self.sessions) as session:
                return leases.take_lease(session, LEASE, self.holder, ttl)
        except IntegrityError:  # another worker created the lease row first
            return False

    def _absent(self, batches: list[Overdue]) -> list[Overdue]:
        if self.presence is None:
            return batches
        held = self.presence({task_id(job, index) for _, job, index, _ in batches})
        return [b for b in batches if task_id(b[1], b[2]) not in held]

    def _settle(
        self, batch_id: int, job_id: str, index: int, seen: datetime, why: str
    ) -> tuple[str, bool]:
        """Re-publish or fail one lost or orphaned batch, unless it moved since it was found."""
        with scope(self.sessions) as session:
            batch = ledger.get_batch(session, job_id, index)
            job = jobs.get_job(session, job_id)
            if batch is None or job is None or batch.state != BatchState.SENT:
                return "moved", False
            if as_utc(batch.updated_at) != seen:
                return "moved", False
            kept = ledger.kept(batch)
            if kept is None or batch.sends > self.settings.max_retries:
                if batch.sends > self.settings.max_retries:
                    reason = (
                        f"its message was lost {batch.sends} times (sent, never finished, gone"
                        " from the broker or its worker dead); last error:"
                        f" {batch.last_error or 'none'}"
                    )
                else:
                    reason = (
                        "its message was lost and the ledger holds no texts to send it again"
                        " (sent without embedq's producer, or before the ledger kept them)"
                    )
                _, finished = batch_failures.fail_batch(
                    session, job_id, index, batch.item_ids, reason, FailureKind.LOST
                )
                return "failed", finished
            stalled.mark_resent(session, batch_id, f"{why}; re-published (send {batch.sends + 1})")
            message = BatchMessage.of(job_id, job.model_name, kept, time.time())
            queue = job.queue
        try:
            self.publisher.publish([message], queue)
        except Exception as exc:  # the ledger says it was re-sent; the next sweep tries again
            logger.warning("reconciler could not re-publish batch %s/%d: %s", job_id, index, exc)
        return "republished", False


_COUNTS = ("orphaned", "overdue", "on_broker", "republished", "failed")
LOST = "message lost"
ORPHANED = "its worker died (its machine stopped renewing its alive lease)"


def alive_ttl(settings: Settings) -> float:
    """How long a worker's word that it is alive holds: three sweeps, at least 30 s."""
    return max(3 * settings.sweep_interval, 30.0)
