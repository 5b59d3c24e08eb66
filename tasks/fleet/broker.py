"""What the fleet asks a kombu Redis broker directly: which batches still have a message (in a
queue, its priority sub-lists, or among the unacknowledged ones), and taking a dead worker's
messages out of the unacknowledged ones. The reconciler decides with these
(``tasks.fleet.reconciler``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import redis

from tasks import names

Presence = Callable[[set[str]], set[str]]
"""Given task ids, the ones whose message the broker still holds."""
Release = Callable[[set[str]], set[str]]
"""Given task ids, take their messages out of the unacknowledged ones; the ones it took."""


def redis_release(url: str) -> Release:
    """Takes messages out of kombu's unacknowledged ones on a Redis broker (the hash and its
    index), so Redis does not hand them out again when their visibility timeout passes."""
    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)

    def release(ids: set[str]) -> set[str]:
        released: set[str] = set()
        if not ids:
            return released
        for tag, value in client.hscan_iter("unacked", count=200):
            found = _task_ids_of_unacked(value)
            if found & ids:
                pipe = client.pipeline(transaction=True)
                pipe.hdel("unacked", tag)
                pipe.zrem("unacked_index", tag)
                removed, _ = pipe.execute()
                if removed:
                    released |= found
        return released

    return release


def redis_presence(url: str, queues: Iterable[str] = tuple(names.Queue)) -> Presence:
    """A presence check on a kombu Redis broker: which task ids have a message in the queue
    lists (with kombu's priority sub-lists) or among the unacknowledged messages (running,
    waiting for a countdown, or held by a worker that died and not yet restored)."""
    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
    keys = [key for queue in queues for key in names.queue_lists(queue)]

    def present(ids: set[str]) -> set[str]:
        found: set[str] = set()
        for key in keys:
            start = 0
            while True:
                chunk = client.lrange(key, start, start + 199)
                for item in chunk:
                    found |= _task_ids(item)
                if len(chunk) < 200:
                    break
                start += 200
        for _, value in client.hscan_iter("unacked", count=200):
            found |= _task_ids_of_unacked(value)
        return found & ids

    return present


def _task_ids(raw: bytes | str) -> set[str]:
    try:
        return _ids_in(json.loads(raw)["headers"])
    except (ValueError, KeyError, TypeError):
        return set()


def _task_ids_of_unacked(value: bytes | str) -> set[str]:
    try:  # [message, exchange, routing key]
        return _ids_in(json.loads(value)[0]["headers"])
    except (ValueError, IndexError, KeyError, TypeError):
        return set()


def _ids_in(headers: dict[str, object]) -> set[str]:
    """A message's task id and, for an ``embed_many`` message, those of its batches."""
    members = headers.get(names.MEMBERS)
    return {str(headers["id"]), *(map(str, members) if isinstance(members, list) else ())}
