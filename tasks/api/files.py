"""OpenAI's Files for batches: ``POST /v1/files`` (multipart ``file`` and ``purpose=batch``),
``GET /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
``DELETE /v1/files/{id}``.

An upload is streamed to the files folder (``EMBEDQ_FILES_DIR``) and capped at
``EMBEDQ_API_MAX_FILE_BYTES`` (413 past it); only its metadata is a row. A batch's output and
error files (``file-batchout-<batch>``, ``file-batcherr-<batch>``) are written from the store
as they are downloaded (``tasks.openai_batch.output``). A key sees only its own files.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, StreamingResponse

from storage import openai_batches, openai_files
from storage.models import OpenAIBatch, OpenAIFile
from storage.session import scope, sessions_for
from tasks.api import ids
from tasks.api.auth import require_key
from tasks.api.errors import ApiError
from tasks.openai_batch import output, shapes, uploads
from worker.settings import Settings

router = APIRouter(tags=["files"])

PURPOSES = ("batch",)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _missing(file_id: str) -> ApiError:
    return ids.not_found("file", file_id, "file_not_found", "file_id")


def find_file(settings: Settings, file_id: str, owner: str) -> OpenAIFile:
    """The uploaded file ``file_id`` of ``owner``, or 404."""
    if not ids.plausible(file_id):  # a body's ``input_file_id``, not checked on its way in
        raise _missing(file_id)
    with scope(sessions_for(settings.database_url)) as session:
        found = openai_files.get_file(session, file_id, owner)
    if found is None:
        raise _missing(file_id)
    return found


def _output_batch(settings: Settings, out: shapes.OutputFile, owner: str) -> OpenAIBatch:
    """The ended batch whose output (or error) file ``out`` is, or 404."""
    with scope(sessions_for(settings.database_url)) as session:
        batch = openai_batches.get_batch(session, out.batch_id, owner)
    if batch is None or out.id not in (batch.output_file_id, batch.error_file_id):
        raise _missing(out.id)
    return batch


@router.post("/v1/files")
def upload_file(
    request: Request,
    file: Annotated[UploadFile, File(description="a JSON Lines file of batch requests")],
    purpose: Annotated[str, Form(description="'batch'")],
    key: str = Depends(require_key),
) -> dict[str, Any]:
    """Store a batch input file; answers OpenAI's FileObject."""
    settings = _settings(request)
    if purpose not in PURPOSES:
        raise ApiError(400, f"purpose must be one of {list(PURPOSES)}", param="purpose")
    file_id = shapes.new_file_id()
    try:
        size = uploads.save(file.file, settings.files_dir, file_id, settings.api_max_file_bytes)
    except uploads.TooLarge as exc:
        raise ApiError(413, str(exc), code="file_too_large", param="file") from None
    name = (file.filename or "upload.jsonl")[:255]
    row = OpenAIFile(id=file_id, owner=key, filename=name, purpose=purpose, bytes=size)
    with scope(sessions_for(settings.database_url)) as session:
        openai_files.add_file(session, row)
    return shapes.file_object(row)


@router.get("/v1/files")
def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = 100,
    key: str = Depends(require_key),
) -> dict[str, Any]:
    """This key's uploaded files, the newest first."""
    settings = _settings(request)
    with scope(sessions_for(settings.database_url)) as session:
        found = openai_files.list_files(session, key, purpose, max(1, min(limit, 10_000)))
    data = [shapes.file_object(file) for file in found]
    return {"object": "list", "data": data, "has_more": False}


@router.get("/v1/files/{file_id}")
def retrieve_file(
    request: Request, file_id: str = Depends(ids.file_id), key: str = Depends(require_key)
) -> dict[str, Any]:
    """One file's FileObject; a batch output's size is the one recorded when the batch ended."""
    settings = _settings(request)
    out = shapes.OutputFile.parse(file_id)
    if out is None:
        return shapes.file_object(find_file(settings, file_id, key))
    batch = _output_batch(settings, out, key)
    size = batch.error_bytes if out.errors else batch.output_bytes
    if size is None:  # a batch that ended before sizes were recorded: measured once, kept
        sessions = sessions_for(settings.database_url)
        sizes = output.file_sizes(sessions, batch)
        with scope(sessions) as session:
            openai_batches.set_file_sizes(session, batch.id, *sizes)
        size = sizes[out.errors]
    ended = batch.completed_at or batch.cancelled_at or batch.expired_at
    return shapes.output_file_object(out, size, ended)


@router.get("/v1/files/{file_id}/content", response_model=None)
def file_content(
    request: Request, file_id: str = Depends(ids.file_id), key: str = Depends(require_key)
) -> FileResponse | StreamingResponse:
    """A file's bytes: an upload as stored, a batch's output or error file as JSON Lines."""
    settings = _settings(request)
    out = shapes.OutputFile.parse(file_id)
    if out is None:
        found = find_file(settings, file_id, key)
        path = uploads.path_of(settings.files_dir, found.id)
        if not path.is_file():
            raise ApiError(404, f"the bytes of file {file_id} are gone", code="file_not_found")
        return FileResponse(path, media_type="application/octet-stream")
    batch = _output_batch(settings, out, key)
    lines = output.file_lines(sessions_for(settings.database_url), batch, out.errors)
    return StreamingResponse(lines, media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
def delete_file(
    request: Request, file_id: str = Depends(ids.file_id), key: str = Depends(require_key)
) -> dict[str, Any]:
    """Delete an uploaded file no batch reads (409 while one does)."""
    settings = _settings(request)
    if shapes.OutputFile.parse(file_id) is not None:
        raise ApiError(400, "a batch's output file goes with its batch", param="file_id")
    with scope(sessions_for(settings.database_url)) as session:
        if openai_files.get_file(session, file_id, key) is None:
            raise _missing(file_id)
        if openai_files.file_in_use(session, file_id):
            raise ApiError(409, f"file {file_id} is the input of a batch", param="file_id")
        openai_files.delete_file(session, file_id)
    uploads.remove(settings.files_dir, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
