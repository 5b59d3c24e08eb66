"""Uploaded files' bytes, in the files folder (``EMBEDQ_FILES_DIR``) under their id.

The bytes go to disk, never to the database: a batch input of hundreds of megabytes is read
again line by line by the batch's runner, and a folder shared by every ``serve`` instance (a
volume) lets any of them resume a batch. An upload is copied a megabyte at a time to a hidden
``.part`` file and renamed into place once complete and within the cap, so a file under its id
is always whole; the caller records the row only after that, so a row always has its bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from worker.errors import InputError

CHUNK = 1024 * 1024


class TooLarge(InputError):
    """Raised when an upload is over ``EMBEDQ_API_MAX_FILE_BYTES``."""


def path_of(folder: Path, file_id: str) -> Path:
    return folder / file_id


def save(source: BinaryIO, folder: Path, file_id: str, cap: int) -> int:
    """Copy ``source`` to the file ``file_id`` in ``folder``; returns its size. Raises
    ``TooLarge`` (nothing kept) past ``cap`` bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{file_id}.part"
    written = 0
    try:
        with partial.open("wb") as out:
            while chunk := source.read(CHUNK):
                written += len(chunk)
                if written > cap:
                    raise TooLarge(f"the file is over the limit of {cap} bytes")
                out.write(chunk)
        os.replace(partial, path_of(folder, file_id))
    finally:
        partial.unlink(missing_ok=True)
    return written


def remove(folder: Path, file_id: str) -> None:
    path_of(folder, file_id).unlink(missing_ok=True)
