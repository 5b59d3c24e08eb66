"""OpenAI's Batches for ``/v1/embeddings``: ``POST /v1/batches``, ``GET /v1/batches``,
``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.

A batch runs in a background thread of a ``serve`` process that holds its lease
(``tasks.openai_batch.background``): started at creation, and started again by any instance
that is asked about an unfinished batch nobody runs (after a restart, the first request to
these routes resumes them all). Its status and request counts are read from its row, where
its runner keeps them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from storage import openai_batches
from storage.models import OpenAIBatch, OpenAIBatchStatus
from storage.session import scope, sessions_for
from tasks.api import catalog, ids
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


def _answer(batch: OpenAIBatch) -> dict[str, Any]:
    """The batch as OpenAI's Batch, with the request counts its row holds: its runner keeps them
    there while it runs (``storage.openai_batches.keep_counts``), so a poll reads one row."""
    return shapes.batch_object(batch, (batch.total, batch.completed, batch.failed))


def _find(settings: Settings, batch_id: str, key: str) -> OpenAIBatch:
    if not ids.plausible(batch_id):  # ``after``: a query parameter, not checked on its way in
        raise ids.not_found("batch", batch_id, "batch_not_found")
    with scope(sessions_for(settings.database_url)) as session:
        found = openai_batches.get_batch(session, batch_id, key)
    if found is None:
        raise ids.not_found("batch", batch_id, "batch_not_found")
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
    data = [_answer(batch) for batch in found[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(found) > limit,
    }


@router.get("/v1/batches/{batch_id}")
def retrieve_batch(
    request: Request, batch_id: str = Depends(ids.batch_id), key: str = Depends(require_key)
) -> dict[str, Any]:
    """A batch's status and request counts; resumes it if no process runs it."""
    settings: Settings = request.app.state.settings
    batch = _find(settings, batch_id, key)
    if not OpenAIBatchStatus(batch.status).final:
        _start(settings, request.app.state.publisher, batch.id)
    return _answer(batch)


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(
    request: Request, batch_id: str = Depends(ids.batch_id), key: str = Depends(require_key)
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
    return _answer(batch)
