"""Collections over HTTP: the ids nearest a query (``POST /v1/collections/{name}/search``), a
collection's versions (``GET /v1/collections/{name}``) and its current version's vectors
(``GET /v1/collections/{name}/embeddings``).

A collection is a backfill's, made by its operators with ``embedq backfill``: every key may read
it. The backfill an OpenAI batch runs as is its key's alone, so another key is answered 404.
The query is embedded like a one-text ``/v1/embeddings`` request: a job on the interactive
queue, admitted for the key, waited for on the loop, 504 with its id past the wait.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from storage import collections, openai_batches
from storage.models import CollectionVersion, JobState
from storage.session import scope, sessions_for
from tasks import job_wait, search
from tasks.api import admission
from tasks.api.auth import ANONYMOUS, require_key
from tasks.api.embeddings import WAIT_POLL_S, Usage, failure, pending
from tasks.api.errors import ApiError
from tasks.api.jobs import vectors_response
from tasks.backfill import summary
from worker.settings import Settings

router = APIRouter(tags=["collections"])


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, description="the text to search for")
    k: int = Field(10, ge=1, le=search.MAX_K, description="how many ids")


class SearchHit(BaseModel):
    object: Literal["embedq.search_result"] = "embedq.search_result"
    id: str
    score: float
    """Cosine similarity to the query."""


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    collection: str
    version: int
    model: str
    indexed: bool
    """Whether the version's vector index answered (else an exact scan)."""
    data: list[SearchHit]
    usage: Usage


class VersionOut(BaseModel):
    version: int
    model: str
    model_file: str | None
    state: str
    vectors: int
    current: bool
    indexed: bool


class CollectionOut(BaseModel):
    object: Literal["embedq.collection"] = "embedq.collection"
    name: str
    version: int
    """The version readers get."""
    versions: list[VersionOut]


def _current(settings: Settings, name: str, key: str) -> CollectionVersion:
    """The current version of collection ``name``, when ``key`` may read it (404 otherwise)."""
    with scope(sessions_for(settings.database_url)) as session:
        batch = openai_batches.get_batch(session, name)
        hidden = batch is not None and key != ANONYMOUS and batch.owner != key
        version = collections.current_version(session, name)
        if version is None or hidden:
            raise ApiError(404, f"no collection {name!r}", code="collection_not_found")
        session.expunge(version)
        return version


@router.get("/v1/collections/{name}", response_model=CollectionOut)
def get_collection(name: str, request: Request, key: str = Depends(require_key)) -> CollectionOut:
    """A collection's versions and the one readers get."""
    settings: Settings = request.app.state.settings
    current = _current(settings, name, key)
    outcome = summary(settings.database_url, name)
    return CollectionOut(
        name=name,
        version=current.version,
        versions=[
            VersionOut(
                version=v.version,
                model=v.model,
                model_file=v.model_file,
                state=v.state,
                vectors=v.done,
                current=v.current,
                indexed=v.indexed,
            )
            for v in outcome.versions
        ],
    )


@router.get("/v1/collections/{name}/embeddings", response_class=StreamingResponse)
def collection_embeddings(
    name: str,
    request: Request,
    format: Annotated[Literal["npy", "jsonl"], Query()] = "npy",
    key: str = Depends(require_key),
) -> StreamingResponse:
    """The current version's vectors, streamed as ``GET /v1/jobs/{id}/embeddings`` streams a
    job's; ``X-Embedq-Version`` names the version."""
    settings: Settings = request.app.state.settings
    current = _current(settings, name, key)
    answer = vectors_response(settings, current.job_id, format, f"{name}.v{current.version}")
    answer.headers["X-Embedq-Version"] = str(current.version)
    return answer


@router.post("/v1/collections/{name}/search", response_model=SearchResponse)
async def search_collection(
    name: str, body: SearchRequest, request: Request, key: str = Depends(require_key)
) -> SearchResponse:
    """The ``k`` ids of the collection's current version nearest ``query`` (cosine), best
    first; the query is embedded by the workers with the collection's model."""
    state = request.app.state
    settings: Settings = state.settings
    current = await run_in_threadpool(_current, settings, name, key)
    admitted: admission.Admission = state.admission
    with admitted.admit(key, 1) as priority:
        handle = await run_in_threadpool(
            lambda: search.embed_query(
                body.query,
                current.model_name,
                settings,
                tag=f"search:{name}",
                publisher=state.publisher,
                owner=key,
                priority=priority,
            )
        )
        plan = job_wait.steps(handle.just_submitted(), settings.api_wait_timeout, WAIT_POLL_S)
        status = await job_wait.wait_async(plan, handle.status, state.signals, handle.id)
    if status is None:
        raise pending(handle.id, settings)
    if status["state"] != JobState.SUCCEEDED:
        raise failure(status)
    vector, tokens = await run_in_threadpool(search.query_vector, handle)
    hits, indexed = await run_in_threadpool(
        search.nearest, settings.database_url, current.job_id, vector, body.k
    )
    return SearchResponse(
        collection=name,
        version=current.version,
        model=current.model_name,
        indexed=indexed,
        data=[SearchHit(id=hit.item_id, score=hit.score) for hit in hits],
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )
