"""A batch's output and error files, written line by line from the store as they are downloaded.

Nothing is kept on disk or in memory: a page of input lines at a time is read with what the
job holds of their texts, and each line becomes one JSON line of OpenAI's batch output format,
in input order. The same store gives the same bytes (request ids are derived from the batch
and the line), so a download that breaks can be started again.

- A request whose every text is stored goes to the output file: its vectors (floats, or
  base64 of the float32 bytes when it asked for it) and its usage, the token counts the
  workers stored (``embeddings.token_count``), the content cache's copies included.
- A request any text of which failed goes to the error file with the failure's reason (500).
- A line validation rejected goes to the error file: a 400 response, or ``"response": null``
  with an ``error`` when the line is not a request (``requests.NOT_A_REQUEST``).
- A request not finished when the batch was cancelled or expired goes to the error file with
  ``batch_cancelled`` or ``batch_expired``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from storage import backfills, openai_batches
from storage.models import OpenAIBatch, OpenAIBatchRequest
from storage.models import OpenAIBatchStatus as Status
from storage.openai_batches import LineItems
from storage.session import scope
from tasks.openai_batch.requests import NOT_A_REQUEST, PARAMS
from tasks.openai_batch.shapes import embeddings_body

PAGE = 200
"""Input lines read from the store at a time."""


def request_id(batch_id: str, line: int) -> str:
    return f"batch_req_{batch_id.removeprefix('batch_')}_{line}"


def _line(
    batch_id: str, custom_id: str | None, line: int, response: Any, error: Any = None
) -> dict[str, Any]:
    return {
        "id": request_id(batch_id, line),
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


def _response(batch_id: str, line: int, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"status_code": status, "request_id": f"req_{request_id(batch_id, line)}", "body": body}


def _error_body(message: str, type: str, code: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def result_line(
    batch: OpenAIBatch,
    request: OpenAIBatchRequest,
    items: LineItems | None,
    status: str | None = None,
) -> tuple[bool, dict[str, Any]] | None:
    """(goes to the error file, its JSON) for one input line; ``None`` while it is unfinished
    in a batch still running. ``status``: the batch's, when it is about to end in it."""
    bid, line, custom_id = batch.id, request.line, request.custom_id
    status = status or batch.status
    if request.error_code is not None:
        message = request.error or request.error_code
        if request.error_code in NOT_A_REQUEST:
            return True, _line(
                bid, custom_id, line, None, {"code": request.error_code, "message": message}
            )
        body = _error_body(
            message, "invalid_request_error", request.error_code, PARAMS.get(request.error_code)
        )
        return True, _line(bid, custom_id, line, _response(bid, line, 400, body))
    items = items or LineItems({}, [])
    if items.failures:
        body = _error_body(items.failures[0], "server_error", "embedding_failed", None)
        return True, _line(bid, custom_id, line, _response(bid, line, 500, body))
    if len(items.stored) >= request.inputs:
        return False, _line(
            bid, custom_id, line, _response(bid, line, 200, _embeddings(batch, request, items))
        )
    if status in (Status.CANCELLED, Status.EXPIRED):
        code = "batch_cancelled" if status == Status.CANCELLED else "batch_expired"
        error = {"code": code, "message": f"the batch was {status} before this request ran"}
        return True, _line(bid, custom_id, line, None, error)
    return None


def _embeddings(
    batch: OpenAIBatch, request: OpenAIBatchRequest, items: LineItems
) -> dict[str, Any]:
    texts = [items.stored[index] for index in range(request.inputs)]
    vectors = [(text.vector, text.token_count) for text in texts]
    return embeddings_body(str(batch.model), vectors, request.base64)


def _results(
    sessions: sessionmaker[Session],
    batch: OpenAIBatch,
    errors: bool | None = None,
    status: str | None = None,
) -> Iterator[tuple[bool, bytes]]:
    """(goes to the error file, the line's bytes) for each finished input line, in order: the
    error file's (``errors=True``), the output file's (``False``) or both (``None``)."""
    after = 0
    with scope(sessions) as session:
        job_id = backfills.job_of(session, batch.id)
    while True:
        with scope(sessions) as session:
            page = openai_batches.request_page(session, batch.id, after, PAGE)
            if not page:
                return
            held: dict[int, LineItems] = {}
            if job_id is not None:
                held = openai_batches.items_of_lines(session, job_id, page[0].line, page[-1].line)
        for request in page:
            result = result_line(batch, request, held.get(request.line), status)
            if result is not None and errors in (None, result[0]):
                yield result[0], json.dumps(result[1], separators=(",", ":")).encode() + b"\n"
        after = page[-1].line


def file_lines(
    sessions: sessionmaker[Session], batch: OpenAIBatch, errors: bool
) -> Iterator[bytes]:
    """The output file of ``batch`` (``errors=False``) or its error file, a line at a time."""
    return (line for _, line in _results(sessions, batch, errors))


def file_sizes(
    sessions: sessionmaker[Session], batch: OpenAIBatch, status: str | None = None
) -> tuple[int, int]:
    """The bytes of the batch's (output, error) files, written through once, as they are when
    it is in ``status`` (default: its own): the runner records them as the batch ends, so a
    file's metadata never reads the file."""
    sizes = [0, 0]
    for to_errors, line in _results(sessions, batch, None, status):
        sizes[to_errors] += len(line)
    return sizes[0], sizes[1]
