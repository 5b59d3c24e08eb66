"""API errors in OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``.

Clients written for OpenAI (its Python client among them) read that shape and pick their
exception class from the status, so every failure the API answers goes through it: our own
``ApiError``, FastAPI's request validation, HTTP errors (unknown path, wrong method), and the
store or broker being unreachable (503, which a client retries).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException

from storage.models import FailureKind
from tasks import failures
from worker.errors import EmbedqError

logger = logging.getLogger(__name__)

# OpenAI's error types, by status, for errors that do not choose their own.
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    504: "timeout_error",
}

# Codes for HTTP errors raised outside our endpoints (a body over the cap met while FastAPI
# parses it is raised as an HTTPException).
CODES = {413: "request_too_large"}
# Validation errors that are input OpenAI would refuse with a 400 (not a wrong type): their
# type is their code.
BAD_INPUT = frozenset({"token_arrays"})


class ApiError(Exception):
    """Raised by an endpoint to answer ``status`` with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param


def body(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def respond(error: ApiError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The response that ``error`` answers."""
    return JSONResponse(
        body(error.message, error.type, error.code, error.param),
        status_code=error.status,
        headers=headers,
    )


def answer(error: ApiError) -> JSONResponse:
    """The response that ``error`` answers, with its own headers (and ``Retry-After`` on a
    429)."""
    headers = {"Retry-After": "60"} if error.status == 429 else {}
    return respond(error, {**headers, **(error.headers or {})})


def _api_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ApiError):  # registered for ApiError only
        raise exc
    return answer(exc)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        raise exc
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if status == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    error = ApiError(status, message, TYPES.get(status, "invalid_request_error"), CODES.get(status))
    return respond(error, exc.headers)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A body that is not JSON is a 400; JSON of the wrong shape a 422 naming the field."""
    if not isinstance(exc, RequestValidationError):  # registered for it only
        raise exc
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    if first.get("type") == "json_invalid":
        return respond(ApiError(400, "the request body is not valid JSON"))
    message = str(first.get("msg", "invalid request"))
    if first.get("type") in BAD_INPUT:
        return respond(ApiError(400, message, param=param, code=str(first["type"])))
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return respond(ApiError(422, message, param=param))


def _failure(request: Request, exc: Exception) -> JSONResponse:
    """One of embedq's errors, or the store out of reach, answered by its kind
    (``tasks.failures.classify``): input the producer refused before storing anything (an empty
    text, a bad name) is a 400, a service out of reach a 503, anything else a 500."""
    kind = failures.classify(exc)
    if kind == FailureKind.INPUT:
        return respond(ApiError(400, str(exc), code="invalid_input"))
    if kind == FailureKind.UNAVAILABLE:
        return _unavailable(exc)
    return _internal(request, exc)


def _unavailable(exc: Exception) -> JSONResponse:
    # SQLAlchemy's text can hold the URL and the driver's words: the client is told which
    # service is down; the log keeps the exception's type. (embedq's own UnavailableError
    # messages show URLs redacted already.)
    if isinstance(exc, OperationalError):
        text = "the job store cannot be reached"
    else:
        text = str(exc).splitlines()[0] if str(exc) else "a service cannot be reached"
    logger.warning("answering 503 (%s): %s", type(exc).__name__, text)
    error = ApiError(503, f"{text}; try again later", "server_error", "service_unavailable")
    return respond(error, {"Retry-After": "5"})


def _internal(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the exception (and re-raises it to the server) after this answers.
    return respond(ApiError(500, "internal error", "server_error"))


def install(app: FastAPI) -> None:
    """Answer every error ``app`` raises in OpenAI's error body."""
    app.add_exception_handler(Exception, _internal)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(EmbedqError, _failure)
    app.add_exception_handler(OperationalError, _failure)
