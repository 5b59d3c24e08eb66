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

Every worker runs a sweep every ``EMBEDQ_SWEEP_INTERVAL`` seconds (``tasks.fleet``); a lease row
in the store lets one of them sweep at a time across the fleet.

**Dead workers.** A worker killed outright (``docker kill``, a lost host) leaves the batches it
ran among Redis's unacknowledged messages, which Redis hands out again only after the visibility
timeout (by default 31 minutes). Each worker process says it is alive with a lease renewed every
sweep (``ledger.keep_alive``). A batch claimed on a machine that has said so before and where no
worker process says so any more is its worker's orphan: the sweep takes its message out of the
unacknowledged ones (so Redis will not hand it out later as well) and re-publishes it, the same
way as a lost one. A machine that never said so (a worker of an older version) is left to the
visibility timeout, and on a machine where another worker process still lives (one host, two
workers) so is a dead one's batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage import ledger, repository
from storage.models import BatchState, as_utc
from storage.session import scope
from tasks import names
from tasks.message import BatchMessage, task_id
from worker.settings import Settings

logger = logging.getLogger(__name__)

LEASE = "reconciler"
Publish = Callable[[BatchMessage, str], None]
Presence = Callable[[set[str]], set[str]]
"""Given task ids, the ones whose message the broker still holds."""
Release = Callable[[set[str]], set[str]]
"""Given task ids, take their messages out of the unacknowledged ones; the ones it took."""
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
        publish: Publish,
        presence: Presence | None,
        holder: str,
        recheck_after_s: float = 0.5,
        release: Release | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.publish = publish
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
                for b in ledger.overdue_batches(session, self.settings.stuck_after, limit=limit)
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
        with scope(self.sessions) as session:
            known = ledger.machines(session, FORGET_S)
            orphans = [
                (b.id, b.job_id, b.batch_index, as_utc(b.updated_at))
                for b in ledger.claimed_batches(session, alive_ttl(self.settings), limit)
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
                return ledger.take_lease(session, LEASE, self.holder, ttl)
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
            job = repository.get_job(session, job_id)
            if batch is None or job is None or batch.state != BatchState.SENT:
                return "moved", False
            if as_utc(batch.updated_at) != seen:
                return "moved", False
            pending: dict[str, Any] = batch.payload or {}
            texts: list[str] = list(pending.get("texts") or [])
            reason = None
            if batch.sends > self.settings.max_retries:
                reason = (
                    f"its message was lost {batch.sends} times (sent, never finished, gone from"
                    f" the broker or its worker dead); last error: {batch.last_error or 'none'}"
                )
            elif not texts:
                reason = (
                    "its message was lost and the ledger holds no texts to send it again (sent"
                    " without embedq's producer, or before the ledger kept them)"
                )
            if reason is not None:
                _, finished = ledger.fail_batch(session, job_id, index, batch.item_ids, reason)
                return "failed", finished
            ledger.mark_resent(session, batch_id, f"{why}; re-published (send {batch.sends + 1})")
            message = BatchMessage.model_construct(
                job_id=job_id,
                batch_index=index,
                model=job.model_name,
                texts=texts,
                item_ids=list(batch.item_ids),
                positions=list(pending.get("positions") or []),
                enqueued_at=time.time(),
                model_wait_since=None,
                tries=0,
            )
            queue = job.queue
        try:
            self.publish(message, queue)
        except Exception as exc:  # the ledger says it was re-sent; the next sweep tries again
            logger.warning("reconciler could not re-publish batch %s/%d: %s", job_id, index, exc)
        return "republished", False


_COUNTS = ("orphaned", "overdue", "on_broker", "republished", "failed")
LOST = "message lost"
ORPHANED = "its worker died (its machine stopped renewing its alive lease)"


def alive_ttl(settings: Settings) -> float:
    """How long a worker's word that it is alive holds: three sweeps, at least 30 s."""
    return max(3 * settings.sweep_interval, 30.0)


def redis_release(url: str) -> Release:
    """Takes messages out of kombu's unacknowledged ones on a Redis broker (the hash and its
    index), so Redis does not hand them out again when their visibility timeout passes."""
    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)

    def release(ids: set[str]) -> set[str]:
        released: set[str] = set()
        if not ids:
            return released
        for tag, value in client.hscan_iter("unacked", count=200):
            found = _task_id_of_unacked(value)
            if found in ids:
                pipe = client.pipeline(transaction=True)
                pipe.hdel("unacked", tag)
                pipe.zrem("unacked_index", tag)
                removed, _ = pipe.execute()
                if removed:
                    released.add(found)
        return released

    return release


def redis_presence(url: str, queues: Iterable[str] = tuple(names.Queue)) -> Presence:
    """A presence check on a kombu Redis broker: which task ids have a message in the queue
    lists (with kombu's priority sub-lists) or among the unacknowledged messages (running,
    waiting for a countdown, or held by a worker that died and not yet restored)."""
    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
    keys = [key for queue in queues for key in (queue, *(f"{queue}\x06\x16{p}" for p in (3, 6, 9)))]

    def present(ids: set[str]) -> set[str]:
        found: set[str] = set()
        for key in keys:
            start = 0
            while True:
                chunk = client.lrange(key, start, start + 199)
                found.update(_task_id(item) for item in chunk)
                if len(chunk) < 200:
                    break
                start += 200
        for _, value in client.hscan_iter("unacked", count=200):
            found.add(_task_id_of_unacked(value))
        return found & ids

    return present


def _task_id(raw: bytes | str) -> str:
    try:
        return str(json.loads(raw)["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return ""


def _task_id_of_unacked(value: bytes | str) -> str:
    try:  # [message, exchange, routing key]
        return str(json.loads(value)[0]["headers"]["id"])
    except (ValueError, IndexError, KeyError, TypeError):
        return ""
