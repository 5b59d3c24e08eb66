"""OpenAI's objects as embedq answers them: the embeddings list (``POST /v1/embeddings`` and
each line of a batch's output file), the File and Batch objects, and the ids they go by.

A batch's output and error files are not rows: they are read from the store when downloaded,
so their ids name the batch (``file-batchout-<batch>``, ``file-batcherr-<batch>``) and a
download needs no lookup table.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from storage.models import OpenAIBatch, OpenAIFile, as_utc

OUTPUT_PREFIX = "file-batchout-"
ERROR_PREFIX = "file-batcherr-"


def embeddings_body(
    model: str, vectors: Sequence[tuple[bytes, int]], as_base64: bool
) -> dict[str, Any]:
    """OpenAI's embeddings list for ``vectors`` (each a vector's float32 bytes and the tokens
    counted for its text), in order: floats, or the bytes base64-encoded when asked for."""
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": (
                base64.b64encode(vector).decode("ascii")
                if as_base64
                else np.frombuffer(vector, dtype="<f4").tolist()
            ),
        }
        for index, (vector, _) in enumerate(vectors)
    ]
    tokens = sum(count for _, count in vectors)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class OutputFile:
    """A batch's output (``errors=False``) or error file, named by its id."""

    batch_id: str
    errors: bool

    @property
    def id(self) -> str:
        return (ERROR_PREFIX if self.errors else OUTPUT_PREFIX) + self.batch_id

    @property
    def filename(self) -> str:
        return f"{self.batch_id}_{'error' if self.errors else 'output'}.jsonl"

    @classmethod
    def parse(cls, file_id: str) -> OutputFile | None:
        """The output file ``file_id`` names, or ``None`` when it names an uploaded file."""
        for prefix, errors in ((OUTPUT_PREFIX, False), (ERROR_PREFIX, True)):
            if file_id.startswith(prefix):
                return cls(file_id.removeprefix(prefix), errors)
        return None


def stamp(moment: datetime | None) -> int | None:
    """A stored time as OpenAI's Unix seconds."""
    return None if moment is None else int(as_utc(moment).timestamp())


def file_object(file: OpenAIFile) -> dict[str, Any]:
    """An uploaded file as OpenAI's FileObject."""
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": stamp(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "status_details": None,
    }


def output_file_object(output: OutputFile, size: int, created: datetime | None) -> dict[str, Any]:
    """A batch's output or error file as OpenAI's FileObject (``size``: its bytes)."""
    return {
        "id": output.id,
        "object": "file",
        "bytes": size,
        "created_at": stamp(created),
        "filename": output.filename,
        "purpose": "batch_output",
        "status": "processed",
        "status_details": None,
    }


def batch_object(batch: OpenAIBatch, counts: tuple[int, int, int]) -> dict[str, Any]:
    """A batch as OpenAI's Batch; ``counts`` are its (total, completed, failed) requests."""
    total, completed, failed = counts
    errors = None
    if batch.errors:
        errors = {"object": "list", "data": batch.errors}
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": stamp(batch.created_at),
        "in_progress_at": stamp(batch.in_progress_at),
        "expires_at": stamp(batch.expires_at),
        "finalizing_at": stamp(batch.finalizing_at),
        "completed_at": stamp(batch.completed_at),
        "failed_at": stamp(batch.failed_at),
        "expired_at": stamp(batch.expired_at),
        "cancelling_at": stamp(batch.cancelling_at),
        "cancelled_at": stamp(batch.cancelled_at),
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": batch.meta,
        "model": batch.model,
    }
