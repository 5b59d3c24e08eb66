"""What a failure is, decided once: worth another try or not (``is_transient``), which kind it is
when it ends items (``classify``), how long to wait before the next try, and the one line that
says why.

Transient: the store or the broker could not be reached or timed out (a restart, a network
blip, an SQLite lock held past the busy timeout), a model source was unreachable, or the batch
ran past the soft time limit (a host overloaded for a while). The same batch is likely to
succeed later, so it is sent again after an exponential backoff with jitter (so a fleet that
lost its database does not come back in lockstep). Everything else is permanent: input the
schema cannot hold, a malformed message, an unknown or corrupt model, or a bug; trying again
would fail the same way, so the batch's items fail at once with the reason.

Both walk the chain of causes, but stop at the first of embedq's own errors: it was raised on
purpose and says what it is. (A model whose download ran past its soft time limit is a
``ModelError`` raised from the time limit: final, though the time limit alone is transient.)

Every reader maps the kind, never the text of a reason: the worker stores it with the failed
items and the job (``storage.models.FailureKind``), the API answers 400 for ``input``, the CLI
exits 4 for ``unavailable``, the metrics count errors by it.
"""

from __future__ import annotations

import random

import redis.exceptions
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from kombu.exceptions import OperationalError as BrokerError
from pydantic import ValidationError
from sqlalchemy import exc as sql

from storage.models import FailureKind
from worker.errors import (
    EmbedqError,
    InputError,
    ModelError,
    ProviderError,
    TransientError,
)
from worker.settings import Settings

_UNREACHABLE: tuple[type[BaseException], ...] = (
    sql.OperationalError,  # refused, dropped, "database is locked", server shutting down
    sql.InterfaceError,  # a connection that broke under the driver
    sql.TimeoutError,  # no pooled connection free in time
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    BrokerError,
    ConnectionError,
    TimeoutError,
)
_DEPTH = 5


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from, up to the first of embedq's own errors."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < _DEPTH:
        chain.append(current)
        if isinstance(current, EmbedqError):
            break
        current = current.__cause__
    return chain


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or the error it wraps) may go away by itself: try again later."""
    for error in _causes(exc):
        if isinstance(error, EmbedqError):
            return isinstance(error, TransientError)
        if isinstance(error, (*_UNREACHABLE, SoftTimeLimitExceeded)):
            return True
    return False


def classify(exc: BaseException) -> FailureKind:
    """The kind of failure ``exc`` is, when it ends items (after any retries)."""
    for error in _causes(exc):
        if isinstance(error, (InputError, ValidationError)):
            return FailureKind.INPUT
        if isinstance(error, (ModelError, ProviderError)):
            return FailureKind.MODEL
        if isinstance(error, TransientError):
            return FailureKind.UNAVAILABLE
        if isinstance(error, EmbedqError):  # raised on purpose: the request cannot be served
            return FailureKind.INPUT
        if isinstance(error, (WorkerLostError, TimeLimitExceeded, SoftTimeLimitExceeded)):
            return FailureKind.WORKER
        if isinstance(error, _UNREACHABLE):
            return FailureKind.UNAVAILABLE
    return FailureKind.INTERNAL


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
