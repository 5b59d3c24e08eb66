"""How much one key may ask of ``/v1/embeddings`` at once, so that one client cannot hold the
interactive queue for everyone.

- A request carries at most ``EMBEDQ_API_MAX_INPUTS`` texts (2,048, OpenAI's own limit; the
  batch path has the same cap per line): 100,000 strings in one request held ``interactive``
  for 849 s while another key's one-text request timed out behind 506 messages.
- A key may have at most ``EMBEDQ_API_MAX_WAITING_TEXTS`` texts waiting on this instance; past
  that its requests are answered 429 until some finish. Work that large belongs to
  ``/v1/jobs`` on the bulk queue or to ``/v1/batches``.

- A request's messages go to the interactive queue with a priority that falls as its key's
  texts ahead grow (``priority_for``: what the key has waiting on this instance, this request
  included, in messages of ``EMBEDQ_JOB_BATCH_SIZE`` texts): a key asking for a message's worth
  goes first, one with thousands waiting goes behind it. A worker takes the lightest step first
  (``tasks.names.FIRST``), so another key's one text waits for the batch running now, not for
  the thousands admitted before it. Within a step the queue is first come, first served, and
  every step is served while the worker has nothing lighter (no key starves while it is idle).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tasks import names
from tasks.api.errors import ApiError


def check_count(count: int, limit: int) -> None:
    """Raise ``ApiError`` 400 for a request of more than ``limit`` texts."""
    if count > limit:
        raise ApiError(
            400,
            f"'input' holds {count} texts, over the limit of {limit} per request: split it, or"
            " send large work as a job (POST /v1/jobs) or a batch (POST /v1/batches)",
            param="input",
            code="too_many_inputs",
        )


STEPS = ((1, names.FIRST), (4, 3), (16, 6))
"""Messages' worth of texts ahead of a request (its key's waiting ones and its own) up to which
it gets each priority; past the last, ``names.LAST``."""


def priority_for(texts_ahead: int, batch_texts: int) -> int:
    """The priority of a request with ``texts_ahead`` texts of its key in front of or in it, on
    a queue of messages of ``batch_texts`` texts (``STEPS``)."""
    for messages, priority in STEPS:
        if texts_ahead <= messages * batch_texts:
            return priority
    return names.LAST


class Admission:
    """The texts each key has waiting on this instance."""

    def __init__(self, max_waiting: int, batch_texts: int) -> None:
        self.max_waiting = max_waiting
        self.batch_texts = batch_texts
        self._waiting: dict[str, int] = {}
        self._lock = threading.Lock()

    def waiting(self, key: str) -> int:
        with self._lock:
            return self._waiting.get(key, 0)

    @contextmanager
    def admit(self, key: str, texts: int) -> Iterator[int]:
        """Count ``texts`` as waiting for ``key`` while the block runs, which is handed their
        priority (``priority_for``). Raises ``ApiError`` 429 when they would pass the key's
        limit (a key with nothing waiting is always let in)."""
        with self._lock:
            before = self._waiting.get(key, 0)
            if before and before + texts > self.max_waiting:
                raise ApiError(
                    429,
                    f"key {key} has {before} texts waiting on this instance; with {texts} more"
                    f" it would pass its limit of {self.max_waiting}: wait for them, or send"
                    " large work as a job (POST /v1/jobs) or a batch (POST /v1/batches)",
                    "rate_limit_error",
                    "too_many_waiting",
                    headers={"Retry-After": "1"},
                )
            self._waiting[key] = before + texts
        try:
            yield priority_for(before + texts, self.batch_texts)
        finally:
            with self._lock:
                left = self._waiting[key] - texts
                if left:
                    self._waiting[key] = left
                else:
                    del self._waiting[key]
