"""Job completion signals: a waiting client blocks on Redis instead of polling the store.

The store stays the truth; this only says when to look. The worker whose batch finishes a job
(after its transaction commits) pushes one entry to ``embedq:finished:<job id>``, kept for a
minute; ``JobHandle.wait`` blocks on that list between reads of the job row, so a finished job
is seen within a millisecond and a waiting client costs the database one query per ``poll``
seconds instead of one every few milliseconds (which, on a small machine, also takes CPU from
the worker it waits for). With a broker that is not Redis, ``wait`` polls.

The entry is the job's final status as the finishing transaction returned it (committed before
the signal is sent), so the waiter returns without reading the job row again; a signal without
one (``1``, from the worker's parent after a lost batch) only says to read the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from typing import Any, TypedDict, cast

import redis
import redis.asyncio
from sqlalchemy import Row

logger = logging.getLogger(__name__)

KEY = "embedq:finished:{}"
TTL_S = 60  # covers the gap between a waiter's last read of the job row and its BLPOP

_clients: dict[tuple[int, int, str], redis.Redis] = {}


class JobStatus(TypedDict):
    """A job's state and counts: what ``JobHandle.status`` and ``wait`` return, and what a
    completion signal carries (a mapping, as the README shows it, with typed keys)."""

    id: str
    state: str
    """A ``storage.models.JobState`` value."""
    model: str
    total: int
    done: int
    failed: int
    error: str | None
    """The first reason an item failed."""
    error_kind: str | None
    """A ``storage.models.FailureKind`` value: what kind of failure ``error`` is."""


def _client(url: str) -> redis.Redis | None:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    key = (os.getpid(), threading.get_ident(), url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
    return _clients[key]


def status_of(row: Row[*tuple[Any, ...]]) -> JobStatus:
    """The status ``JobHandle.status`` returns, from a ``storage.jobs.job_status`` row."""
    return {
        "id": row.id,
        "state": str(row.state),
        "model": row.model_name,
        "total": row.total_items,
        "done": row.done_items,
        "failed": row.failed_items,
        "error": row.error,
        "error_kind": None if row.error_kind is None else str(row.error_kind),
    }


def signal(url: str, job_id: str, status: JobStatus | None = None) -> None:
    """Wake the clients waiting for ``job_id``, handing them its final ``status`` when given;
    they poll if this fails, so it only logs."""
    signal_many(url, [(job_id, status)])


def signal_many(url: str, finished: list[tuple[str, JobStatus | None]]) -> None:
    """``signal`` for several jobs, in one round trip to Redis (a group the feeder stored)."""
    client = _client(url)
    if client is None or not finished:
        return
    try:
        pipe = client.pipeline(transaction=False)
        for job_id, status in finished:
            key = KEY.format(job_id)
            pipe.lpush(key, json.dumps(status) if status is not None else 1)
            pipe.expire(key, TTL_S)
        pipe.execute()
    except redis.RedisError as exc:
        shown = ", ".join(job_id for job_id, _ in finished[:3])
        logger.warning("could not signal that jobs %s finished: %s", shown, exc)


def block(url: str | None, job_id: str, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``job_id``'s signal; false when there is no Redis to wait on
    (the caller polls)."""
    return receive(url, job_id, seconds)[0]


def receive(url: str | None, job_id: str, seconds: float) -> tuple[bool, JobStatus | None]:
    """``block``, and the final status the signal carried (``None`` when it carried none, or
    none came)."""
    client = None if url is None else _client(url)
    if client is None:
        return False, None
    try:
        popped = client.blpop([KEY.format(job_id)], timeout=max(seconds, 0.001))
    except redis.RedisError as exc:
        logger.warning("waiting on Redis for job %s failed (%s); polling instead", job_id, exc)
        time.sleep(min(seconds, 0.1))
        return True, None
    return True, None if popped is None else _status(popped[1], job_id)


async def receive_async(
    client: redis.asyncio.Redis | None, job_id: str, seconds: float
) -> tuple[bool, JobStatus | None]:
    """``receive`` on an event loop, through an asyncio Redis ``client`` (``None``: no Redis,
    the caller polls)."""
    if client is None:
        return False, None
    try:
        popped = await client.blpop([KEY.format(job_id)], timeout=max(seconds, 0.001))
    except redis.RedisError as exc:
        logger.warning("waiting on Redis for job %s failed (%s); polling instead", job_id, exc)
        await asyncio.sleep(min(seconds, 0.1))
        return True, None
    return True, None if popped is None else _status(popped[1], job_id)


def _status(raw: bytes | str, job_id: str) -> JobStatus | None:
    try:
        status = json.loads(raw)
    except ValueError:
        return None
    if (
        isinstance(status, dict)
        and status.get("id") == job_id
        and set(status) == set(JobStatus.__annotations__)
    ):
        return cast(JobStatus, status)
    return None


def close() -> None:
    while _clients:
        _, client = _clients.popitem()
        client.close()
