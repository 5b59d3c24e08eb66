"""API keys and the per-key rate limit.

A request carries ``Authorization: Bearer KEY``; the key is compared with each configured one
in constant time, and from then on known only by its id (the first 8 hex digits of its
sha256), which is what logs and the rate limit see: a key's value is never logged.

The limit is a fixed one-minute window per key id. With a broker (Redis) the count lives
there, so every ``serve`` instance behind a load balancer shares it; in local mode it is
counted in this process. If Redis cannot be reached the request is answered 503: the job it
would submit could not be sent either.

Both run on the event loop (the count through an asyncio Redis client), so a request reaches
its endpoint without a hop through the thread pool for its key.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

import redis
import redis.asyncio
from fastapi import Request

from tasks.api.errors import ApiError
from worker.errors import UnavailableError
from worker.settings import Settings

WINDOW_S = 60
KEY = "embedq:api:rate:{}:{}"
ANONYMOUS = "anonymous"
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
        if client is not None:
            self._count = client.register_script(COUNT)

    async def hit(self, who: str, now: float | None = None) -> int:
        """Count one request by ``who`` and return the window's count so far."""
        window = int((time.time() if now is None else now) // WINDOW_S)
        if self.client is None:
            with self._lock:
                count = self._counts.get((who, window), 0) + 1
                self._counts = {k: v for k, v in self._counts.items() if k[1] >= window}
                self._counts[(who, window)] = count
                return count
        name = KEY.format(who, window)
        try:
            count = await self._count(keys=[name], args=[WINDOW_S * 2])
        except redis.RedisError as exc:
            raise UnavailableError(f"the rate limit's Redis cannot be reached: {exc}") from exc
        return int(count)

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


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


async def require_key(request: Request) -> str:
    """FastAPI dependency: the calling key's id (``anonymous`` when the app runs without
    auth). Raises ``ApiError`` 401 for a missing or unknown key, 429 over the rate limit."""
    state = request.app.state
    if not state.require_auth:
        return ANONYMOUS
    given = _bearer(request)
    if given is None:
        raise ApiError(
            401,
            "no API key: send it as 'Authorization: Bearer KEY'",
            "authentication_error",
            "missing_api_key",
        )
    settings: Settings = state.settings
    match = False
    for secret in settings.api_keys:  # every key compared: the time says nothing of which
        match |= hmac.compare_digest(given.encode(), secret.get_secret_value().encode())
    if not match:
        raise ApiError(401, "incorrect API key", "authentication_error", "invalid_api_key")
    who = key_id(given)
    limiter: RateLimiter = state.limiter
    await limiter.check(who)
    request.state.key_id = who
    return who
