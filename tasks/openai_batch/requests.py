"""The lines of a batch's input file, read as OpenAI's batch requests, and the reader that feeds
their texts to the batch's backfill.

A line is checked on its own (``parse_line`` is a pure function of the line and the batch's
model), so validation and the backfill's reader, which read the file at different times and
maybe in different processes, agree on every line without sharing memory. Two kinds of
rejection, as OpenAI's error file has them:

- a line that is not a request this batch runs (not JSON, not an object, no ``custom_id``, a
  method or URL other than ``POST /v1/embeddings``): ``"response": null`` and an ``error``;
- a request whose body ``/v1/embeddings`` would refuse (no model, another model than the
  batch's, an empty or non-text input, an unknown ``encoding_format``): a 400 response with
  OpenAI's error body, as the endpoint would have answered.
A request is all or nothing: one empty text rejects the whole request, before any text of it
is embedded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from storage.models import ID_LENGTH
from storage.openai_batches import item_name
from tasks.backfill.readers import Row
from worker.validation import is_unicode

ENDPOINT = "/v1/embeddings"
MAX_INPUTS = 2048
"""Texts per request at most, as OpenAI's embeddings endpoint allows."""

NOT_A_REQUEST = frozenset(
    {"invalid_json_line", "invalid_request", "missing_custom_id", "invalid_method", "invalid_url"}
    | {"duplicate_custom_id"}
)
"""Error codes of lines that get ``"response": null`` in the error file."""
PARAMS = {
    "invalid_body": "body",
    "missing_model": "model",
    "model_mismatch": "model",
    "invalid_input": "input",
    "invalid_encoding_format": "encoding_format",
    "invalid_dimensions": "dimensions",
}
"""The body field each 400 error code is about (``param`` in OpenAI's error body)."""


@dataclass(frozen=True)
class Request:
    """A line the batch runs: its custom id, model, texts and whether it wants base64."""

    line: int
    custom_id: str
    model: str
    texts: list[str]
    base64: bool = False
    dimensions: int | None = None
    """The dimension asked for: checked against the model's by the validation, which knows it."""


@dataclass(frozen=True)
class Rejected:
    """A line the batch does not run, with an error ``code`` and a message saying why."""

    line: int
    custom_id: str | None
    code: str
    message: str


def lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, bytes) of each line of ``path`` that is not blank; read as a
    stream, one line in memory at a time."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, raw


def parse_line(line: int, raw: bytes, model: str | None = None) -> Request | Rejected:
    """Line ``line`` of a batch's input read as a request; ``model`` is the batch's (``None``:
    any model is accepted, as for the first request of the file)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return Rejected(line, None, "invalid_json_line", f"line {line} is not JSON: {exc}")
    except RecursionError:  # 100,000 nested '[' killed the runner and left the batch validating
        return Rejected(line, None, "invalid_json_line", f"line {line} is nested too deeply")
    if not isinstance(record, dict):
        return Rejected(line, None, "invalid_request", f"line {line} is not a JSON object")
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > ID_LENGTH:
        return Rejected(
            line,
            None,
            "missing_custom_id",
            f"line {line} has no custom_id (a non-empty string of up to {ID_LENGTH} characters)",
        )
    if not is_unicode(custom_id) or "\x00" in custom_id:
        return Rejected(line, None, "missing_custom_id", f"line {line}'s custom_id is not text")
    if record.get("method") != "POST":
        return Rejected(line, custom_id, "invalid_method", f"line {line}: the method must be POST")
    if record.get("url") != ENDPOINT:
        return Rejected(
            line, custom_id, "invalid_url", f"line {line}: the url must be {ENDPOINT!r}"
        )
    return _body(line, custom_id, record.get("body"), model)


def _body(line: int, custom_id: str, body: object, model: str | None) -> Request | Rejected:
    def rejected(code: str, message: str) -> Rejected:
        return Rejected(line, custom_id, code, message)

    if not isinstance(body, dict):
        return rejected("invalid_body", "the body must be a JSON object")
    named = body.get("model")
    if not isinstance(named, str) or not named:
        return rejected("missing_model", "you must provide a model parameter")
    if model is not None and named != model:
        return rejected(
            "model_mismatch",
            f"every request of a batch must use the same model: this batch's is {model!r},"
            f" not {named!r}",
        )
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    problem = _input_problem(texts)
    if problem is not None:
        return rejected("invalid_input", problem)
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64", None):
        return rejected(
            "invalid_encoding_format",
            f"encoding_format must be 'float' or 'base64', not {encoding!r}",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
    ):
        return rejected("invalid_dimensions", "dimensions must be a positive integer")
    checked = cast(list[str], texts)  # _input_problem found it a list of strings
    return Request(line, custom_id, named, checked, encoding == "base64", dimensions)


def check_dimensions(request: Request, dim: int | None) -> Request | Rejected:
    """``request``, or its rejection when it asks a dimension the model (of dimension ``dim``,
    ``None`` while no host has prepared it) does not produce: vectors are not shortened."""
    if request.dimensions is None or dim is None or request.dimensions == dim:
        return request
    return Rejected(
        request.line,
        request.custom_id,
        "invalid_dimensions",
        f"model {request.model!r} produces {dim} dimensions and cannot be shortened: ask {dim}"
        " or leave dimensions out",
    )


def _input_problem(texts: object) -> str | None:
    """Why ``texts`` (a request's ``input``, a string already made a list) cannot be embedded."""
    if not isinstance(texts, list) or not texts:
        return "'input' must be a non-empty string or a non-empty list of strings"
    if len(texts) > MAX_INPUTS:
        return f"'input' holds {len(texts)} texts, over the {MAX_INPUTS} a request may hold"
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            what = "token ids" if isinstance(text, (int, list)) else type(text).__name__
            return f"'input'[{index}] is {what}: embedq embeds text (strings) only"
        if not text.strip():
            return f"'input'[{index}] is empty or whitespace only"
        if not is_unicode(text) or "\x00" in text:
            return f"'input'[{index}] is not valid Unicode text"
    return None


@dataclass
class InputReader:
    """The texts of a batch's requests, as a backfill source (a ``Reader`` of
    ``tasks.backfill.readers``): one row per text, named ``item_name(line, index)``. Lines the
    validation rejected (``skip``, read from the store) yield nothing; the counts come from the
    store too (``texts``)."""

    path: Path
    model: str
    skip: set[int]
    texts: int

    @property
    def description(self) -> str:
        return f"{self.path.name} (OpenAI batch input)"

    def count(self) -> int | None:
        return self.texts

    def rows(self) -> Iterator[Row]:
        position = 0
        for line, raw in lines(self.path):
            if line in self.skip:
                continue
            parsed = parse_line(line, raw, self.model)
            if isinstance(parsed, Rejected):  # validation rejected it too
                continue
            for index, text in enumerate(parsed.texts):
                yield Row(position, item_name(line, index), text)
                position += 1
