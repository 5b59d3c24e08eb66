"""Wire names: task names and queues, in one place. Producers send by these names, so an
application without embedq installed can enqueue with plain ``send_task``."""

from __future__ import annotations

from enum import StrEnum

EMBED = "embedq.embed"
EMBED_MANY = "embedq.embed_many"
"""Several batches (of one-batch jobs a producer gathered) in one message: ``tasks.gathering``."""
MEMBERS = "embedq_batches"
"""The header of an ``embed_many`` message that names its batches' task ids, so the broker can
be asked whether a batch's message is still there without reading message bodies."""


class Queue(StrEnum):
    """Queues, in the order a worker serving both should take work from them."""

    INTERACTIVE = "interactive"
    BULK = "bulk"


DOWNLOAD = "embedq.download"


FIRST = 0
LAST = 9
"""Message priorities, 0 taken first: on Redis kombu keeps a list per step (0, 3, 6, 9) and a
worker takes every queue's lowest step before the next (interactive before bulk within a step).
Bulk messages always go ``LAST``; an interactive message's step comes from how much its API key
has waiting (``tasks.api.admission.priority_for``), so a light key is not served behind a heavy
one. RabbitMQ queues are declared without priorities and ignore them."""
PRIORITY_STEPS = (FIRST, 3, 6, LAST)
"""kombu's Redis priority steps (its default): one list per step."""


def queue_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps for ``queue``: its own (step 0), then one per other step."""
    return [queue, *(f"{queue}\x06\x16{step}" for step in PRIORITY_STEPS[1:])]
