"""``GET /health``: this instance's readiness, for a load balancer.

It must answer while the instance is busy, so it takes nothing that requests queue for: Redis
is pinged on the event loop, and the store in a thread pool of its own (two threads), not the
one the endpoints share. Each check is bounded by ``CHECK_S`` seconds.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import redis.asyncio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from storage.session import ping, scope, sessions_for
from worker.settings import Settings

router = APIRouter()
CHECK_S = 5.0
_store_checks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="health")


def _ping_store(url: str) -> None:
    with scope(sessions_for(url)) as session:
        ping(session)


async def _store(url: str) -> str:
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(_store_checks, _ping_store, url), CHECK_S)
    except (SQLAlchemyError, TimeoutError) as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok"


async def _broker(settings: Settings, client: redis.asyncio.Redis | None) -> str:
    if settings.broker_url is None:
        return "none (local mode)"
    if client is None:  # a broker that is not Redis: Celery's own connection checks it
        return "ok"
    try:
        await asyncio.wait_for(client.ping(), CHECK_S)
    except (redis.RedisError, TimeoutError) as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok"


@router.get("/health", tags=["operations"])
async def health(request: Request) -> JSONResponse:
    """This instance's readiness: 200 when the job store and the broker answer, else 503
    naming what does not. No key needed; it shows no data."""
    settings: Settings = request.app.state.settings
    store, broker = await asyncio.gather(
        _store(settings.database_url), _broker(settings, request.app.state.async_redis)
    )
    checks = {"store": store, "broker": broker}
    ok = all(value == "ok" or value.startswith("none") for value in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", **checks}, 200 if ok else 503)
