"""OpenAI's Batches for ``/v1/embeddings``: ``POST /v1/batches``, ``GET /v1/batches``,
``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.

A batch runs in a background thread of a ``serve`` process that holds its lease
(``tasks.openai_batch.background``): started at creation, and started again by any instance
that is asked about an unfinished batch nobody runs (after a restart, the first request to
these routes resumes them all). Its status and request counts are read from the store.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from storage import backfills, openai_batches
from storage.models import OpenAIBatch, OpenAIBatchStatus
from storage.session import scope, sessions_for
from tasks.api import catalog
from tasks.api.auth import require_key
from tasks.api.errors import ApiError
from tasks.api.files import find_file
from tasks.openai_batch import background, shapes
from tasks.openai_batch.requests import ENDPOINT
from tasks.openai_batch.runner import Catalog
from tasks.publishing import Publisher
from worker.settings import Settings

router = APIRouter(tags=["batches"])

WINDOW = "24h"


class BatchCreate(BaseModel):
    """OpenAI's batch creation parameters."""

    input_file_id: str = Field(description="an uploaded file of purpose 'batch'")
    endpoint: str = Field(description="'/v1/embeddings'")
    completion_window: str = Field(description="'24h'")
    metadata: dict[str, str] | None = Field(None, description="up to 16 pairs, kept as given")


METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
"""OpenAI's bounds on a batch's ``metadata``: pairs, characters of a key, of a value."""


def check_metadata(metadata: dict[str, str] | None) -> None:
    """Raise ``ApiError`` 400 for ``metadata`` past OpenAI's bounds (unbounded, a 14.4 MB
    batch object was accepted and answered on every poll)."""
    if metadata is None:
        return
    if len(metadata) > METADATA_PAIRS:
        raise ApiError(400, f"metadata holds {METADATA_PAIRS} pairs at most", param="metadata")
    for key, value in metadata.items():
        if len(key) > METADATA_KEY or len(value) > METADATA_VALUE:
            raise ApiError(
                400,
                f"metadata keys hold {METADATA_KEY} characters at most and values"
                f" {METADATA_VALUE}: {key[:20]!r} is over",
                param="metadata",
            )


def _catalog(settings: Settings) -> Catalog:
    def models() -> dict[str, int | None]:
        return {name: info.dim for name, info in catalog.known_models(settings).items()}

    return models


def resume_unfinished(settings: Settings, publisher: Publisher | None = None) -> None:
    """At startup: run the unfinished batches no live process holds (after a restart, this
    instance's or a dead one's), without waiting for someone to ask about them."""
    _start(settings, publisher)


def _start(settings: Settings, publisher: Publisher | None, batch_id: str | None = None) -> None:
    """Resume this process's share of unfinished batches (once), and run ``batch_id``; their
    batches go to ``publisher`` (the app's; default: the settings' broker)."""
    sessions, models = sessions_for(settings.database_url), _catalog(settings)
    background.resume_all(settings, sessions=sessions, catalog=models, publisher=publisher)
    if batch_id is not None:
        background.ensure_running(
            batch_id, settings, sessions=sessions, catalog=models, publisher=publisher
        )


COUNTS_FRESH_S = 2.0
"""How old the request counts of a running batch may be when a poll answers them: counting
reads every stored text of the batch's job (about 0.2 s for 200,000 lines here), so clients
polling in a loop share one count a few seconds."""
_counted: dict[str, tuple[float, tuple[int, int, int]]] = {}
_counted_lock = threading.Lock()


def _counts(settings: Settings, batch: OpenAIBatch) -> tuple[int, int, int]:
    if OpenAIBatchStatus(batch.status).final:  # stored when it ended
        return batch.total, batch.completed, batch.failed
    now = time.monotonic()
    with _counted_lock:
        fresh = _counted.get(batch.id)
        if fresh is not None and now - fresh[0] < COUNTS_FRESH_S:
            return fresh[1]
    with scope(sessions_for(settings.database_url)) as session:
        job_id = backfills.job_of(session, batch.id)
        counts = openai_batches.request_counts(session, batch.id, job_id)
    with _counted_lock:
        for stale in [key for key, (at, _) in _counted.items() if now - at >= COUNTS_FRESH_S]:
            del _counted[stale]
        _counted[batch.id] = (now, counts)
    return counts


def _answer(settings: Settings, batch: OpenAIBatch) -> dict[str, Any]:
    return shapes.batch_object(batch, _counts(settings, batch))


def _find(settings: Settings, batch_id: str, key: str) -> OpenAIBatch:
    with scope(sessions_for(settings.database_url)) as session:
        found = openai_batches.get_batch(session, batch_id, key)
    if found is None:
        raise ApiError(404, f"no such batch: {batch_id}", code="batch_not_found")
    return found


@router.post("/v1/batches")
def create_batch(
    body: BatchCreate, request: Request, key: str = Depends(require_key)
) -> dict[str, Any]:
    """Create a batch over an uploaded file and start running it."""
    settings: Settings = request.app.state.settings
    if body.endpoint != ENDPOINT:
        raise ApiError(400, f"embedq runs batches of {ENDPOINT} only", param="endpoint")
    if body.completion_window != WINDOW:
        raise ApiError(400, f"completion_window must be {WINDOW!r}", param="completion_window")
    check_metadata(body.metadata)
    file = find_file(settings, body.input_file_id, key)
    if file.purpose != "batch":
        raise ApiError(400, f"file {file.id} is not a batch input", param="input_file_id")
    created = datetime.now(UTC)
    batch = OpenAIBatch(
        id=shapes.new_batch_id(),
        owner=key,
        input_file_id=file.id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        status=OpenAIBatchStatus.VALIDATING,
        meta=body.metadata,
        total=0,
        completed=0,
        failed=0,
        created_at=created,
        expires_at=created + timedelta(hours=24),
    )
    with scope(sessions_for(settings.database_url)) as session:
        openai_batches.add_batch(session, batch)
    _start(settings, request.app.state.publisher, batch.id)
    return shapes.batch_object(batch, (0, 0, 0))


@router.get("/v1/batches")
def list_batches(
    request: Request,
    after: str | None = None,
    limit: int = 20,
    key: str = Depends(require_key),
) -> dict[str, Any]:
    """This key's batches, the newest first (``after``: a batch id, for the next page)."""
    settings: Settings = request.app.state.settings
    _start(settings, request.app.state.publisher)
    since = _find(settings, after, key).created_at if after else None
    limit = max(1, min(limit, 100))
    with scope(sessions_for(settings.database_url)) as session:
        found = openai_batches.list_batches(session, key, since, limit + 1)
    data = [_answer(settings, batch) for batch in found[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(found) > limit,
    }


@router.get("/v1/batches/{batch_id}")
def retrieve_batch(
    request: Request, batch_id: str, key: str = Depends(require_key)
) -> dict[str, Any]:
    """A batch's status and request counts; resumes it if no process runs it."""
    settings: Settings = request.app.state.settings
    batch = _find(settings, batch_id, key)
    if not OpenAIBatchStatus(batch.status).final:
        _start(settings, request.app.state.publisher, batch.id)
    return _answer(settings, batch)


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(
    request: Request, batch_id: str, key: str = Depends(require_key)
) -> dict[str, Any]:
    """Stop sending the batch's requests: it is ``cancelling`` until the batches in flight end,
    then ``cancelled``; what was not sent goes to the error file as ``batch_cancelled``."""
    settings: Settings = request.app.state.settings
    batch = _find(settings, batch_id, key)
    with scope(sessions_for(settings.database_url)) as session:
        openai_batches.move_batch(
            session,
            batch.id,
            OpenAIBatchStatus.CANCELLING,
            only_from=[OpenAIBatchStatus.VALIDATING, OpenAIBatchStatus.IN_PROGRESS],
            cancelling_at=datetime.now(UTC),
        )
    batch = _find(settings, batch_id, key)
    if batch.status not in (OpenAIBatchStatus.CANCELLING, OpenAIBatchStatus.CANCELLED):
        raise ApiError(409, f"batch {batch.id} is {batch.status}: too late to cancel it")
    _start(settings, request.app.state.publisher, batch.id)
    return _answer(settings, batch)
