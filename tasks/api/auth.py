"""API keys and the per-key rate limit.

A request carries ``Authorization: Bearer KEY``; the key is compared with each configured one
in constant time, and from then on known only by its id (the first 8 hex digits of its
sha256), which is what logs and the rate limit see: a key's value is never logged.

The key is checked by ``KeyGate`` from the request's headers, before its body is read. Wrong
keys are counted per client address and answered 429 past ``EMBEDQ_API_AUTH_FAILURE_LIMIT`` a
minute (valid keys are never held back by them).

The limit is a fixed one-minute window per key id. With a broker (Redis) the count lives
there, so every ``serve`` instance behind a load balancer shares it; in local mode, or while
that Redis cannot be reached, it is counted in this process (so reads that need no broker go
on through an outage; a job's submit then fails on its own with a 503).

Both run on the event loop (the count through an asyncio Redis client), so a request reaches
its endpoint without a hop through the thread pool for its key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time

import redis
import redis.asyncio
from fastapi import Request
from starlette.datastructures import Headers, State
from starlette.types import ASGIApp, Receive, Scope, Send

from tasks.api.errors import ApiError, answer
from worker.settings import Settings

logger = logging.getLogger(__name__)

WINDOW_S = 60
KEY = "embedq:api:rate:{}:{}"
ANONYMOUS = "anonymous"
PROTECTED = "/v1"
"""Paths that need a key; ``/health`` and the docs do not."""
KEY_ID = "embedq_key_id"
TIMEOUT_S = 5
COUNT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""
"""One window's count, in one atomic command: the key expires after the window is past."""


def _redis_broker(settings: Settings) -> str | None:
    url = settings.broker_url
    if url is None or not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return url


def async_broker_client(settings: Settings, connections: int = 100) -> redis.asyncio.Redis | None:
    """An asyncio Redis client on the broker with up to ``connections`` connections, when the
    broker is Redis; ``None`` in local mode or on another broker."""
    url = _redis_broker(settings)
    return (
        None
        if url is None
        else redis.asyncio.Redis.from_url(
            url,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            max_connections=connections,
        )
    )


def key_id(key: str) -> str:
    """The name a key goes by in logs and counters."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class RateLimiter:
    """Counts requests per key id in fixed one-minute windows, in Redis or in this process."""

    def __init__(self, limit: int, client: redis.asyncio.Redis | None = None) -> None:
        self.limit = limit
        self.client = client
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._warned: int | None = None
        if client is not None:
            self._count = client.register_script(COUNT)

    async def hit(self, who: str, now: float | None = None) -> int:
        """Count one request by ``who`` and return the window's count so far: in Redis, or in
        this process when there is none or it cannot be reached (the limit then holds per
        instance, and requests that need no broker, such as reading a job, go on)."""
        window = int((time.time() if now is None else now) // WINDOW_S)
        if self.client is None:
            return self._hit_here(who, window)
        try:
            count = await self._count(keys=[KEY.format(who, window)], args=[WINDOW_S * 2])
        except redis.RedisError as exc:
            if self._warned != window:
                self._warned = window
                logger.warning("rate limit counted in this process: Redis is away (%s)", exc)
            return self._hit_here(who, window)
        return int(count)

    def _hit_here(self, who: str, window: int) -> int:
        with self._lock:
            count = self._counts.get((who, window), 0) + 1
            self._counts = {k: v for k, v in self._counts.items() if k[1] >= window}
            self._counts[(who, window)] = count
            return count

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def check(self, who: str) -> None:
        """Count a request; raise ``ApiError`` 429 when ``who`` is over the limit."""
        if self.limit and await self.hit(who) > self.limit:
            raise ApiError(
                429,
                f"rate limit of {self.limit} requests per minute reached for key {who};"
                " try again in the next minute",
                "rate_limit_error",
                "rate_limit_exceeded",
            )


def _bearer(headers: Headers) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def _known(given: str, settings: Settings) -> bool:
    match = False
    for secret in settings.api_keys:  # every key compared: the time says nothing of which
        match |= hmac.compare_digest(given.encode(), secret.get_secret_value().encode())
    return match


async def authenticate(state: State, headers: Headers, address: str) -> str:
    """The calling key's id (``anonymous`` when the app runs without auth), after its count.
    Raises ``ApiError``: 401 for a missing or unknown key, 429 over the key's rate limit or,
    for a wrong key, over ``EMBEDQ_API_AUTH_FAILURE_LIMIT`` wrong keys a minute from
    ``address`` (a valid key is never held back by others' wrong ones)."""
    if not state.require_auth:
        return ANONYMOUS
    given = _bearer(headers)
    if given is None:
        raise ApiError(
            401,
            "no API key: send it as 'Authorization: Bearer KEY'",
            "authentication_error",
            "missing_api_key",
        )
    settings: Settings = state.settings
    if not _known(given, settings):
        limiter: RateLimiter = state.limiter
        limit = settings.api_auth_failure_limit
        if limit and await limiter.hit(f"wrong-key:{address}") > limit:
            raise ApiError(
                429,
                f"over {limit} requests with a wrong API key from {address} this minute;"
                " try again in the next minute",
                "rate_limit_error",
                "rate_limit_exceeded",
            )
        raise ApiError(401, "incorrect API key", "authentication_error", "invalid_api_key")
    who = key_id(given)
    await state.limiter.check(who)
    return who


class KeyGate:
    """ASGI middleware: every ``/v1`` request's key is checked (and counted) from its headers
    before anything reads its body, so a request without a valid key is refused without its
    body being read or parsed (an upload of 190 MB was spooled to disk, and invalid JSON
    answered 400, before the 401). The key's id is left in the request's state for
    ``require_key``."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else "unknown"
        try:
            who = await authenticate(self.state, Headers(scope=scope), address)
        except ApiError as error:
            await answer(error)(scope, receive, send)
            return
        scope.setdefault("state", {})[KEY_ID] = who
        await self.app(scope, receive, send)


async def require_key(request: Request) -> str:
    """FastAPI dependency: the calling key's id, as ``KeyGate`` found it."""
    who = request.scope.get("state", {}).get(KEY_ID)
    if not isinstance(who, str):  # a route outside the gate's paths asked for a key
        raise ApiError(401, "no API key checked", "authentication_error", "missing_api_key")
    return who
