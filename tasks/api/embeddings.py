"""``POST /v1/embeddings`` in OpenAI's request and response shapes.

The texts become a job on the ``interactive`` queue and the request waits for it
(``EMBEDQ_API_WAIT_TIMEOUT``); past that it answers 504 with the job's id (the job goes on and
``GET /v1/jobs/{id}`` follows it), marked ``x-should-retry: false`` so OpenAI's client does not
submit the texts again on its own. ``usage`` is the tokens the workers really counted (after
truncation), read from the store with the vectors. The job's id is in the ``x-embedq-job``
header of every answer, and a ``Server-Timing`` header says where the request's time went
inside the server: ``submit`` (the job's rows and messages), ``wait`` (the workers), ``read``
(the vectors from the store) and ``encode`` (the JSON); what a client sees beyond their sum is
the HTTP layer's (``bench/api.py`` reports it).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from storage import embeddings
from storage.models import FailureKind, JobState
from storage.session import scope, sessions_for
from tasks import job_wait, names, producer
from tasks.api import admission, catalog
from tasks.api.auth import require_key
from tasks.api.errors import ApiError
from tasks.completion import JobStatus
from tasks.openai_batch.shapes import embeddings_body
from tasks.publishing import Publisher
from worker.settings import Settings

router = APIRouter(tags=["embeddings"])
JOB_HEADER = "x-embedq-job"
"""The job that answered a request (OpenAI's body has no place for it): ``embedq job ID``."""
WAIT_POLL_S = 2.0
"""Longest block on a job's completion signal between two reads of its row: the signal carries
the final status, so the reads are only for a signal that never came."""


TOKEN_ARRAYS = (
    "token arrays are not accepted: embedq tokenises texts with each model's own tokenizer, so"
    " send the texts themselves. LangChain's OpenAIEmbeddings sends token arrays by default:"
    " create it with check_embedding_ctx_length=False"
)


def texts(value: object) -> object:
    """A string or a list of strings; OpenAI's token arrays (a list of ints, or of lists of
    ints, as LangChain sends) are refused by name (a 400, ``errors.BAD_INPUT``)."""
    if isinstance(value, list) and not all(isinstance(item, str) for item in value):
        if all(isinstance(item, (int, list)) for item in value):
            raise PydanticCustomError("token_arrays", TOKEN_ARRAYS)
        raise ValueError("must be a string or a list of strings")
    if not isinstance(value, (str, list)):
        raise ValueError("must be a string or a list of strings")
    return value


Input = Annotated[str | list[str], BeforeValidator(texts)]


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request."""

    input: Input = Field(description="a text, or a list of texts, to embed")
    model: str = Field(description="a model from GET /v1/models", min_length=1)
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as little-endian float32 bytes, base64-encoded"
    )
    dimensions: int | None = Field(
        None, ge=1, description="accepted only when it is the model's own dimension"
    )
    user: str | None = Field(None, description="accepted and ignored")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """OpenAI's embeddings response."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


def failure(status: JobStatus) -> ApiError:
    """The error a failed (or partly failed) job answers: 400 when the failure is the input's
    (a text the model refused), 500 for anything else, with the job's first recorded reason."""
    reason = status["error"] or "no reason recorded"
    words = f"job {status['id']} {status['state']}: {status['failed']} of {status['total']}"
    message = f"{words} texts failed: {reason}"
    headers = {JOB_HEADER: status["id"]}
    if status["error_kind"] == FailureKind.INPUT:
        return ApiError(400, message, code="invalid_input", param="input", headers=headers)
    return ApiError(500, message, "server_error", code="job_failed", headers=headers)


def pending(job_id: str, settings: Settings) -> ApiError:
    """The 504 of a request whose job did not finish within the wait: the job goes on."""
    return ApiError(
        504,
        f"job {job_id} did not finish within {settings.api_wait_timeout:g}s; it goes on:"
        f" follow it at GET /v1/jobs/{job_id}",
        "timeout_error",
        code="job_pending",
        headers={"x-should-retry": "false", JOB_HEADER: job_id},
    )


def check_dimensions(asked: int | None, dim: int | None, model: str) -> None:
    if asked is not None and dim is not None and asked != dim:
        raise ApiError(
            400,
            f"model {model!r} produces {dim} dimensions and cannot be shortened: ask {dim}"
            " or leave dimensions out",
            code="invalid_dimensions",
            param="dimensions",
        )


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(
    body: EmbeddingRequest, request: Request, key: str = Depends(require_key)
) -> Response:
    """Embed ``input`` with ``model`` and answer the vectors in input order."""
    # What blocks briefly (the model's lookup, the job's rows and messages, the vectors' read)
    # runs in the thread pool; the wait for the workers runs on the loop (tasks.job_wait), so
    # waiting requests hold no thread.
    state = request.app.state
    settings: Settings = state.settings
    given = [body.input] if isinstance(body.input, str) else body.input
    admission.check_count(len(given), settings.api_max_inputs)
    admitted: admission.Admission = state.admission
    with admitted.admit(key, len(given)) as priority:
        timing = Timing()
        handle = await run_in_threadpool(
            submit, given, body, key, settings, state.models, state.publisher, priority
        )
        timing.mark("submit")
        plan = job_wait.steps(handle.just_submitted(), settings.api_wait_timeout, WAIT_POLL_S)
        status = await job_wait.wait_async(plan, handle.status, state.signals, handle.id)
    if status is None:
        raise pending(handle.id, settings)
    timing.mark("wait")
    if status["state"] != JobState.SUCCEEDED:
        raise failure(status)
    return await run_in_threadpool(answer, body, handle, settings, timing)


def submit(
    given: list[str],
    body: EmbeddingRequest,
    key: str,
    settings: Settings,
    models: catalog.ModelCache,
    publisher: Publisher | None = None,
    priority: int = names.FIRST,
) -> producer.JobHandle:
    """The request's texts as a job on the interactive queue with ``priority``, tagged with the
    key's id."""
    info = models.find(body.model)
    check_dimensions(body.dimensions, info.dim, body.model)
    return producer.submit(
        given,
        model=body.model,
        queue=names.Queue.INTERACTIVE,
        tag=f"api:{key}",
        settings=settings,
        publisher=publisher,
        owner=key,
        priority=priority,
    )


def answer(
    body: EmbeddingRequest, handle: producer.JobHandle, settings: Settings, timing: Timing
) -> Response:
    """OpenAI's response for a job that succeeded: its vectors and token counts, read from
    the store."""
    with scope(sessions_for(settings.database_url)) as session:
        rows = embeddings.vectors_with_tokens(session, handle.id)
    timing.mark("read")
    if rows:
        check_dimensions(body.dimensions, len(rows[0].vector) // 4, body.model)
    vectors = [(bytes(row.vector), int(row.token_count)) for row in rows]
    content = embeddings_body(body.model, vectors, body.encoding_format == "base64")
    # Built by hand: validating a million floats against the model would cost more than the
    # job; the response model documents the shape.
    encoded = json.dumps(content)
    timing.mark("encode")
    headers = {JOB_HEADER: handle.id, "server-timing": timing.header()}
    return Response(encoded, media_type="application/json", headers=headers)


class Timing:
    """Milliseconds per phase since the last mark, as a ``Server-Timing`` header."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._phases: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self._phases.append((phase, (now - self._last) * 1000))
        self._last = now

    def header(self) -> str:
        return ", ".join(f"{phase};dur={ms:.3f}" for phase, ms in self._phases)
