"""Which errors are worth another try, and when to try.

Transient: the store or the broker could not be reached or timed out (a restart, a network
blip, an SQLite lock held past the busy timeout), a model source was unreachable, or the batch
ran past the soft time limit (a host overloaded for a while). The same
batch is likely to succeed later, so it is sent again after an exponential backoff with jitter
(so a fleet that lost its database does not come back in lockstep). Everything else is
permanent: input the schema cannot hold, a malformed message, an unknown or corrupt model, or a
bug; trying again would fail the same way, so the batch's items fail at once with the reason.
"""

from __future__ import annotations

import random

import redis.exceptions
from billiard.exceptions import SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import exc as sql

from worker.errors import TransientError
from worker.settings import Settings

_TRANSIENT: tuple[type[BaseException], ...] = (
    sql.OperationalError,  # refused, dropped, "database is locked", server shutting down
    sql.InterfaceError,  # a connection that broke under the driver
    sql.TimeoutError,  # no pooled connection free in time
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    BrokerError,
    ConnectionError,
    TimeoutError,
    TransientError,
    SoftTimeLimitExceeded,  # an overloaded host; the hard limit stays the backstop
)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or the error it wraps) may go away by itself."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 5:
        if isinstance(current, _TRANSIENT):
            return True
        current = current.__cause__
        seen += 1
    return False


def backoff(tries: int, settings: Settings) -> float:
    """Seconds before try ``tries + 1``: 1, 2, 4 ... up to the cap, halved at random (equal
    jitter). Kept under half the visibility timeout, or Redis would hand the waiting message
    to a second worker."""
    cap = min(settings.retry_backoff_max, settings.visibility() / 2)
    delay = min(cap, 2.0**tries)
    return random.uniform(delay / 2, delay)


def describe(exc: BaseException) -> str:
    """A one-line reason for the store: the error's class and the first line of its message."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 500:
        first = first[:500] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
