"""The request body cap, answered 413 in OpenAI's error body.

A Content-Length over the cap is refused before a byte of the body is read; a body without one
(chunked) is counted as it arrives and refused as soon as it passes the cap, so an endpoint
never holds more than the cap in memory. The cap depends on the path: file uploads have their
own (``EMBEDQ_API_MAX_FILE_BYTES``), everything else ``EMBEDQ_API_MAX_REQUEST_BYTES``.

(FastAPI's own ``max_body_size`` answers a plain-text 413 that OpenAI's clients cannot read.)
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tasks.api.errors import ApiError, respond


class BodyTooLarge(HTTPException):
    """Raised while a body is read, once it passes the cap; FastAPI passes HTTP errors through
    its body parsing, so the app's handler answers it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit).message)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")


class BodyCap:
    """ASGI middleware: the default cap, and larger or smaller ones under path prefixes."""

    def __init__(self, app: ASGIApp, default: int, prefixes: Mapping[str, int]) -> None:
        self.app = app
        self.default = default
        self.prefixes = prefixes

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.prefixes.items():
            if path == prefix or path.startswith(prefix + "/"):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        announced = Headers(scope=scope).get("content-length")
        if announced is not None and announced.isdigit() and int(announced) > limit:
            await respond(too_large(limit))(scope, receive, send)
            return
        seen = 0
        started = False

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped, watched)
        except BodyTooLarge:  # read outside a route's body parsing: answered here
            if started:
                raise
            await respond(too_large(limit))(scope, receive, send)
