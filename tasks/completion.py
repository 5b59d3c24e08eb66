"""Job completion signals: a waiting client blocks on Redis instead of polling the store.

The store stays the truth; this only says when to look. The worker whose batch finishes a job
(after its transaction commits) pushes one entry to ``embedq:finished:<job id>``, kept for a
minute; ``JobHandle.wait`` blocks on that list between reads of the job row, so a finished job
is seen within a millisecond and a waiting client costs the database one query per ``poll``
seconds instead of one every few milliseconds (which, on a small machine, also takes CPU from
the worker it waits for). With a broker that is not Redis, ``wait`` polls.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import redis

logger = logging.getLogger(__name__)

KEY = "embedq:finished:{}"
TTL_S = 60  # covers the gap between a waiter's last read of the job row and its BLPOP

_clients: dict[tuple[int, int, str], redis.Redis] = {}


def _client(url: str) -> redis.Redis | None:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    key = (os.getpid(), threading.get_ident(), url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
    return _clients[key]


def signal(url: str, job_id: str) -> None:
    """Wake the clients waiting for ``job_id``; they poll if this fails, so it only logs."""
    client = _client(url)
    if client is None:
        return
    key = KEY.format(job_id)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.lpush(key, 1)
        pipe.expire(key, TTL_S)
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("could not signal that job %s finished: %s", job_id, exc)


def block(url: str | None, job_id: str, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``job_id``'s signal; false when there is no Redis to wait on
    (the caller polls)."""
    client = None if url is None else _client(url)
    if client is None:
        return False
    try:
        client.blpop([KEY.format(job_id)], timeout=max(seconds, 0.001))
    except redis.RedisError as exc:
        logger.warning("waiting on Redis for job %s failed (%s); polling instead", job_id, exc)
        time.sleep(min(seconds, 0.1))
    return True


def close() -> None:
    while _clients:
        _, client = _clients.popitem()
        client.close()
