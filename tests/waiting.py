"""Waiting on a condition, never on a fixed time: the tests' one polling loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    every: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> T:
    """The first truthy value ``predicate`` returns, asked every ``every`` seconds; an
    ``AssertionError`` naming ``what`` (and ``detail()``, such as a process's log) when
    ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            more = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{more}")
        time.sleep(every)
