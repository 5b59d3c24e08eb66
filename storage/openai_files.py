"""Files uploaded through the API's ``POST /v1/files``: their rows (the bytes live in the files
folder, ``EMBEDQ_FILES_DIR``). A key sees only its own files.

Functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from storage.models import OpenAIBatch, OpenAIFile


def add_file(session: Session, file: OpenAIFile) -> OpenAIFile:
    session.add(file)
    return file


def get_file(session: Session, file_id: str, owner: str | None = None) -> OpenAIFile | None:
    """The file ``file_id``; ``None`` when there is none, or it is not ``owner``'s."""
    found = session.get(OpenAIFile, file_id)
    return found if found is not None and owner in (None, found.owner) else None


def list_files(
    session: Session, owner: str, purpose: str | None, limit: int
) -> Sequence[OpenAIFile]:
    """``owner``'s files, the newest first."""
    query = select(OpenAIFile).where(OpenAIFile.owner == owner)
    if purpose is not None:
        query = query.where(OpenAIFile.purpose == purpose)
    return session.scalars(query.order_by(OpenAIFile.created_at.desc()).limit(limit)).all()


def file_in_use(session: Session, file_id: str) -> bool:
    """Whether a batch reads ``file_id``."""
    found = session.scalar(
        select(OpenAIBatch.id).where(OpenAIBatch.input_file_id == file_id).limit(1)
    )
    return found is not None


def delete_file(session: Session, file_id: str) -> None:
    session.execute(delete(OpenAIFile).where(OpenAIFile.id == file_id))
