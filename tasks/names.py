"""Wire names: task names and queues, in one place. Producers send by these names, so an
application without embedq installed can enqueue with plain ``send_task``."""

from __future__ import annotations

from enum import StrEnum

EMBED = "embedq.embed"


class Queue(StrEnum):
    """Queues, in the order a worker serving both should take work from them."""

    INTERACTIVE = "interactive"
    BULK = "bulk"


DOWNLOAD = "embedq.download"
