"""The ids in the API's paths (``/v1/files/{file_id}``, ``/v1/batches/{batch_id}``,
``/v1/jobs/{job_id}``): what one may look like, checked once, before any route reads the store.

An id that cannot name anything embedq stores (a control character, a NUL among them, which
PostgreSQL refuses in a query and which answered 500 with a traceback of 137 lines; or more than
``MAX_ID`` characters) answers the 404 of an unknown object, in OpenAI's error body, as an id
that names nothing does. Each route takes its id through the dependency of its kind
(``file_id``, ``batch_id``, ``job_id``), so the check and its answer are written here only.
"""

from __future__ import annotations

from tasks.api.errors import ApiError

MAX_ID = 64
"""The longest id a path may hold: the widest id column these routes read (``api_files.id``,
``api_batches.id``; job ids are 36 characters)."""


def plausible(value: str) -> bool:
    """Whether ``value`` could be an id embedq gave: 1 to ``MAX_ID`` printable characters."""
    return 0 < len(value) <= MAX_ID and value.isprintable()


def not_found(kind: str, value: str, code: str, param: str | None = None) -> ApiError:
    """The 404 of an unknown ``kind`` (file, batch, job) named ``value`` (shown only when it is
    a plausible id: an over-long one is not echoed back)."""
    shown = value if plausible(value) else "an id embedq never gives"
    return ApiError(404, f"no such {kind}: {shown}", code=code, param=param)


def file_id(file_id: str) -> str:
    """The path's ``file_id``, or the 404 of an unknown file."""
    if not plausible(file_id):
        raise not_found("file", file_id, "file_not_found", "file_id")
    return file_id


def batch_id(batch_id: str) -> str:
    """The path's ``batch_id``, or the 404 of an unknown batch."""
    if not plausible(batch_id):
        raise not_found("batch", batch_id, "batch_not_found")
    return batch_id


def job_id(job_id: str) -> str:
    """The path's ``job_id``, or the 404 of an unknown job."""
    if not plausible(job_id):
        raise not_found("job", job_id, "job_not_found")
    return job_id
