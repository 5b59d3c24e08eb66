"""embedq's own job endpoints: submit texts without waiting (``POST /v1/jobs``), follow a job
(``GET /v1/jobs/{id}``), and read its vectors streamed from the store
(``GET /v1/jobs/{id}/embeddings``, ``npy`` or ``jsonl``), a page of rows at a time, so a large
job costs the memory of one page.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from storage import embeddings, jobs
from storage.models import Job, JobState, as_utc
from storage.session import scope, sessions_for
from tasks import names, producer, vector_files
from tasks.api import admission, catalog, ids
from tasks.api.auth import ANONYMOUS, require_key
from tasks.api.embeddings import Input
from tasks.api.errors import ApiError
from worker.settings import Settings

router = APIRouter(tags=["jobs"])


class JobRequest(BaseModel):
    """Texts to embed as one job, answered at once with the job (202)."""

    input: Input = Field(description="a text, or a list of texts")
    model: str | None = Field(None, description="default: EMBEDQ_DEFAULT_MODEL", min_length=1)
    ids: list[str] | None = Field(None, description="one unique id per text; default 0, 1, ...")
    queue: Literal["interactive", "bulk"] = "bulk"
    tag: str | None = Field(None, description="default: api:<key id>", min_length=1)


class JobOut(BaseModel):
    """A job's state and counts."""

    id: str
    object: Literal["embedq.job"] = "embedq.job"
    state: str
    model: str
    queue: str
    tag: str | None
    total: int
    done: int
    failed: int
    error: str | None
    """The first reason an item failed."""
    created_at: int
    finished_at: int | None


def _epoch(moment: datetime | None) -> int | None:
    return None if moment is None else int(as_utc(moment).timestamp())


def _out(job: Job) -> JobOut:
    return JobOut(
        id=job.id,
        state=str(job.state),
        model=job.model_name,
        queue=job.queue,
        tag=job.tag,
        total=job.total_items,
        done=job.done_items,
        failed=job.failed_items,
        error=job.error,
        created_at=_epoch(job.created_at) or 0,
        finished_at=_epoch(job.finished_at),
    )


def _job(settings: Settings, job_id: str, key: str) -> JobOut:
    """The job, when ``key`` may see it: its owner (the key that submitted it through the API)
    or anyone when the API runs without keys. Another key's job, or one submitted outside the
    API, is answered as an unknown one: 404, saying nothing of whether it exists."""
    with scope(sessions_for(settings.database_url)) as session:
        job = jobs.get_job(session, job_id)
        if job is None or (key != ANONYMOUS and (job.meta or {}).get(producer.OWNER) != key):
            raise ApiError(404, f"no job {job_id!r}", code="job_not_found")
        return _out(job)


@router.post("/v1/jobs", response_model=JobOut, status_code=202)
def create_job(body: JobRequest, request: Request, key: str = Depends(require_key)) -> JobOut:
    """Enqueue the texts as one job (``bulk`` by default) and answer it without waiting."""
    settings: Settings = request.app.state.settings
    if body.model is not None:
        models: catalog.ModelCache = request.app.state.models
        models.find(body.model)
    given = [body.input] if isinstance(body.input, str) else body.input
    handle = producer.submit(
        given,
        model=body.model,
        ids=body.ids,
        queue=names.Queue(body.queue),
        tag=body.tag or f"api:{key}",
        settings=settings,
        publisher=request.app.state.publisher,
        owner=key,
        # Not waited for, so not counted as waiting: on the interactive queue, its own size
        # decides its step (a large job goes behind one-text requests).
        priority=admission.priority_for(len(given), settings.batch_size_for(body.queue)),
    )
    return _job(settings, handle.id, key)


@router.get("/v1/jobs/{job_id}", response_model=JobOut)
def get_job(
    request: Request, job_id: str = Depends(ids.job_id), key: str = Depends(require_key)
) -> JobOut:
    """A job's state and counts (the calling key's jobs only)."""
    return _job(request.app.state.settings, job_id, key)


@router.get(
    "/v1/jobs/{job_id}/embeddings",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "npy: a float32 matrix (rows in input order); jsonl: one"
            ' {"id", "embedding"} per line',
            "content": {"application/octet-stream": {}, "application/x-ndjson": {}},
        }
    },
)
def job_embeddings(
    request: Request,
    job_id: str = Depends(ids.job_id),
    format: Annotated[Literal["npy", "jsonl"], Query()] = "npy",
    key: str = Depends(require_key),
) -> StreamingResponse:
    """A finished job's vectors, streamed. Items that failed have no row: the ``jsonl`` lines
    carry the ids; ``X-Embedq-Count`` says how many rows follow."""
    settings: Settings = request.app.state.settings
    job = _job(settings, job_id, key)
    if not JobState(job.state).finished:
        raise ApiError(
            409,
            f"job {job_id} is {job.state}: its vectors can be read once it has finished",
            code="job_not_finished",
        )
    return vectors_response(settings, job_id, format, job_id)


def vectors_response(
    settings: Settings, job_id: str, format: str, filename: str
) -> StreamingResponse:
    """``job_id``'s vectors streamed as ``npy`` (``filename``.npy) or ``jsonl``, with their
    count in ``X-Embedq-Count``."""
    with scope(sessions_for(settings.database_url)) as session:
        count, dim = embeddings.count_vectors(session, job_id)
    headers = {"X-Embedq-Count": str(count)}
    rows = vector_files.pages(settings.database_url, job_id)  # a finished job's rows stay put
    if format == "jsonl":
        return StreamingResponse(
            vector_files.jsonl_chunks(rows), media_type="application/x-ndjson", headers=headers
        )
    headers["Content-Disposition"] = f'attachment; filename="{filename}.npy"'
    return StreamingResponse(
        vector_files.npy_chunks(rows, count, dim or 0),
        media_type="application/octet-stream",
        headers=headers,
    )
