"""Waiting for a job to finish: the policy written once (``steps``) and driven two ways, by a
thread (``JobHandle.wait``) and by an event loop (``wait_async``).

``embedq serve`` waits on the event loop: a request that waits for workers then holds a
coroutine and a Redis connection, not one of the thread pool's 40 threads. When each wait held
a thread, 40 waiting requests queued every other sync route behind them (``GET /health`` took
57 s with the worker stopped) and the 41st request's 60 s timeout only began when a thread
came free.

The policy: look at the store, then block on the job's completion signal (``tasks.completion``)
for up to ``poll`` seconds between looks; a signal that carries the final status ends the wait
without another look. A job submitted a moment ago is not done yet, so its first look is at the
signal. Without Redis to block on, it polls at a tenth of the time waited so far (every 1 ms at
first, at most every ``poll``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from storage.models import JobState
from tasks import completion
from tasks.completion import JobStatus


@dataclass(frozen=True)
class Look:
    """Read the job's status from the store; send it back."""


@dataclass(frozen=True)
class Block:
    """Block on the job's signal for ``seconds``; send back ``(signalled, final status)``."""

    seconds: float


@dataclass(frozen=True)
class Pause:
    """Sleep ``seconds`` (no Redis to block on); send back nothing."""

    seconds: float


Step = Look | Block | Pause
Plan = Generator[Step, Any, JobStatus | None]


def steps(fresh: bool, timeout: float | None, poll: float) -> Plan:
    """The wait as steps for a driver to carry out; it returns the final status, or ``None``
    when ``timeout`` seconds passed first (after one last look). ``fresh``: the job was
    submitted a moment ago."""
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    look = not fresh
    while True:
        if look:
            status: JobStatus = yield Look()
            if JobState(status["state"]).finished:
                return status
        now = time.monotonic()
        if deadline is not None and now > deadline:
            if look:
                return None
            look = True  # one look at the store before giving up
            continue
        look = True
        pause = poll if deadline is None else max(0.0, min(poll, deadline - now))
        received: tuple[bool, JobStatus | None] = yield Block(pause)
        signalled, final = received
        if final is not None and JobState(final["state"]).finished:
            return final
        if not signalled:
            yield Pause(min(pause, max(0.001, (now - started) / 10)))


def drive(
    plan: Plan, status: Callable[[], JobStatus], url: str | None, job_id: str
) -> JobStatus | None:
    """Carry out ``plan`` on this thread, blocking on the signal in the Redis at ``url``
    (``None``: poll); what the plan returns."""
    reply: Any = None
    try:
        while True:
            step = plan.send(reply)
            if isinstance(step, Look):
                reply = status()
            elif isinstance(step, Block):
                reply = completion.receive(url, job_id, step.seconds)
            else:
                time.sleep(step.seconds)
                reply = None
    except StopIteration as done:
        result: JobStatus | None = done.value
        return result


async def wait_async(
    plan: Plan,
    status: Callable[[], JobStatus],
    client: redis.asyncio.Redis | None,
    job_id: str,
) -> JobStatus | None:
    """Carry out ``plan`` on the event loop: looks at the store run in a thread (briefly), the
    blocks on the signal through ``client`` (an asyncio Redis client; ``None``: poll)."""
    reply: Any = None
    try:
        while True:
            step = plan.send(reply)
            if isinstance(step, Look):
                reply = await asyncio.to_thread(status)
            elif isinstance(step, Block):
                reply = await completion.receive_async(client, job_id, step.seconds)
            else:
                await asyncio.sleep(step.seconds)
                reply = None
    except StopIteration as done:
        result: JobStatus | None = done.value
        return result
