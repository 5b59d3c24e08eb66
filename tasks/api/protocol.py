"""The HTTP/1.1 connection ``embedq serve`` runs: uvicorn's httptools protocol with the limits
it lacks, so one client cannot hold an instance's memory or its sockets.

- **Request head size.** The request line and headers together may take at most
  ``EMBEDQ_API_MAX_HEADER_BYTES``; past that the connection is answered 431 and closed as soon
  as the bytes arrive (uvicorn has no such limit: a 100 MB ``Authorization`` header took 30 s to
  refuse and grew the process by 270 MB, while other clients' requests waited).
- **Slow or silent clients.** A request head must arrive whole within
  ``EMBEDQ_API_CLIENT_TIMEOUT`` seconds of the connection opening (or of the previous answer),
  and a body may not pause longer than that between two reads; otherwise the connection is
  closed (408 when part of a head came). Idle and half-sent connections were never closed.
- **Answered before its body was read.** When the app answers (401, 413, 429...) before the
  request's body has arrived, the connection is closed rather than drained: uvicorn went on
  reading, and throwing away, a body of any size after a 413.

The answers are OpenAI's error body (``tasks.api.errors.body``), so its clients can read them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tasks.api.errors import TYPES, body

logger = logging.getLogger(__name__)

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class GuardedProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a head-size limit and client timeouts (class attributes, set
    by ``guarded``)."""

    max_head_bytes: ClassVar[int] = 64 * 1024
    client_timeout: ClassVar[float] = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        reading_head = self._in_head
        if reading_head:
            self._head_bytes += len(data)
        elif self._body_pending():
            self._arm()  # the body moves: its pause clock starts again
        super().data_received(data)
        # The chunk that ends a head may carry a body with it: only a head still unfinished
        # after the whole chunk counts against the limit.
        if reading_head and self._in_head and self._head_bytes > self.max_head_bytes:
            self._refuse(431, f"the request head is over {self.max_head_bytes} bytes")

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        self._arm()  # for the body, if one comes; on_message_complete disarms

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._body_pending() and not self.transport.is_closing():
            # Answered before its body came: close instead of reading the rest for nothing.
            self.transport.close()
            return
        self._in_head = True
        self._head_bytes = 0
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def _body_pending(self) -> bool:
        return self.cycle is not None and self.cycle.more_body and not self._in_head

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.client_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._in_head and self._head_bytes:
            self._refuse(408, f"the request head did not arrive within {self.client_timeout:g}s")
            return
        # Silent since the last answer, or a body paused mid-way (its request may be running:
        # an answer now could cross the app's own; closing ends its read).
        self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        logger.warning("closing a connection from %s: %s", self.client, message)
        content = json.dumps(body(message, TYPES.get(status, "invalid_request_error"))).encode()
        head = [
            b"HTTP/1.1 %d %s" % (status, REASONS[status]),
            b"content-type: application/json",
            b"content-length: %d" % len(content),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + content)
        self.transport.close()
        self._disarm()


def guarded(max_head_bytes: int, client_timeout: float) -> type[GuardedProtocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with these limits."""
    limits: dict[str, Any] = {"max_head_bytes": max_head_bytes, "client_timeout": client_timeout}
    return type("GuardedProtocol", (GuardedProtocol,), limits)
