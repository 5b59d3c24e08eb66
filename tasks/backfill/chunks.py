"""Cutting a stream of source rows into batches of similar length, a window at a time."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from tasks.backfill.readers import Row


def text_sha(text: str) -> str:
    """The sha256 of ``text``, as the content cache keys it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


WINDOW = 8
"""Batches' worth of rows sorted by length together: each batch holds about an eighth of the
lengths a window has, so it pads little."""


def chunks(rows: Iterator[Row], size: int, chars: int, window: int = WINDOW) -> Iterator[list[Row]]:
    """Batches of at most ``size`` rows and ``chars`` characters. Rows are taken a window of
    ``window`` batches at a time and sorted by length within it, so each batch pads little (as
    the producer does for a job); memory stays one window."""
    pending: list[Row] = []
    budget = 0
    for row in rows:
        pending.append(row)
        budget += len(row.text)
        if len(pending) >= size * window or budget >= chars * window:
            yield from cut(pending, size, chars)
            pending, budget = [], 0
    yield from cut(pending, size, chars)


def cut(rows: list[Row], size: int, chars: int) -> Iterator[list[Row]]:
    """``rows`` sorted by length, in batches of at most ``size`` rows and ``chars`` characters."""
    chunk: list[Row] = []
    budget = 0
    for row in sorted(rows, key=lambda r: len(r.text)):
        chunk.append(row)
        budget += len(row.text)
        if len(chunk) >= size or budget >= chars:
            yield chunk
            chunk, budget = [], 0
    if chunk:
        yield chunk
