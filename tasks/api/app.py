"""The ASGI app of ``embedq serve``: ``create_app()`` wires the routers, the error handlers
and the per-app state (settings, whether keys are required, the rate limiter, the broker's
Redis for counts, waits and ``/health``, the model cache).

The app never loads a model: like the producer it writes jobs and reads the store, so several
instances can run behind a load balancer. Request bodies are capped (``tasks.api.limits``).
At startup it resumes the OpenAI batches no live instance runs (``tasks.openai_batch``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tasks import names, producer
from tasks.api import (
    admission,
    catalog,
    collections,
    docs,
    embeddings,
    errors,
    files,
    health,
    jobs,
    openai_batches,
)
from tasks.api.auth import KeyGate, RateLimiter, async_broker_client
from tasks.api.limits import BodyCap
from tasks.publishing import Publisher
from worker.settings import Settings, get_settings

logger = logging.getLogger(__name__)

# A multipart upload carries its file plus the form's boundaries and fields: a megabyte more
# than the file cap covers them (the files router checks the file itself against the cap).
MULTIPART_SLACK = 1024**2
# Requests waiting for their jobs at once, each on a Redis connection; past that many, a wait
# polls the store instead (tasks.completion.receive_async).
WAITING_CONNECTIONS = 1024


def create_app(
    settings: Settings | None = None,
    *,
    require_auth: bool = True,
    publisher: Publisher | None = None,
) -> FastAPI:
    """The API app, working under ``settings`` (default: ``get_settings()``): the store, the
    broker and the limits they name. ``require_auth=False`` is ``serve --insecure-no-auth``
    (every request is ``anonymous``, with no rate limit). Jobs' batches go to ``publisher``
    (default: the settings' broker; tests hand in their own)."""
    settings = settings or get_settings()
    # Two clients: the rate limit's counts and /health on one, and the waits for jobs on one
    # of their own (each waiting request blocks a connection on its signal), so that waiters
    # cannot take the connections /health needs.
    async_client = async_broker_client(settings)
    signals = async_broker_client(settings, connections=WAITING_CONNECTIONS)
    limiter = RateLimiter(settings.api_rate_limit, async_client)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await asyncio.to_thread(openai_batches.resume_unfinished, settings, publisher)
        except Exception:  # the store is away: the first batch request resumes them instead
            logger.warning("could not resume unfinished batches at startup", exc_info=True)
        yield
        await limiter.aclose()  # and the client it counts in
        if signals is not None:
            await signals.aclose()
        producer.dispose()

    app = FastAPI(
        title="embedq",
        summary="Text embeddings as background jobs, with OpenAI's embeddings API.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # served by tasks.api.docs, without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.publisher = publisher
    app.state.require_auth = require_auth
    app.state.async_redis = async_client
    app.state.signals = signals
    app.state.limiter = limiter
    app.state.models = catalog.ModelCache(settings)
    app.state.admission = admission.Admission(
        settings.api_max_waiting_texts, settings.batch_size_for(names.Queue.INTERACTIVE)
    )
    errors.install(app)
    docs.install(app)
    app.add_middleware(
        BodyCap,
        default=settings.api_max_request_bytes,
        prefixes={"/v1/files": settings.api_max_file_bytes + MULTIPART_SLACK},
    )
    app.add_middleware(KeyGate, state=app.state)  # outermost: the key before the body's size
    app.include_router(catalog.router)
    app.include_router(health.router)
    app.include_router(embeddings.router)
    app.include_router(jobs.router)
    app.include_router(files.router)
    app.include_router(openai_batches.router)
    app.include_router(collections.router)
    return app
