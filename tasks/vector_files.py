"""A job's vectors as files, in one set of formats for the CLI's ``export`` and the API's
``GET /v1/jobs/{id}/embeddings``: rows come from the store in pages and are encoded as they
come, so a million vectors need the memory of one page.

Formats:
- ``npy``: a float32 matrix in input order (``npy_chunks``); ``export`` writes the ids beside
  it in ``PATH.ids.txt``;
- ``jsonl``: ``{"id": ..., "embedding": [...]}`` per line (``jsonl_chunks``), the key OpenAI's
  embeddings use;
- ``parquet``: columns ``id`` and ``embedding`` (``export`` only, with pyarrow installed).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
from sqlalchemy.orm import Session

from storage import backfills, embeddings
from storage.embeddings import VectorRow
from storage.session import scope, sessions_for
from worker.errors import InputError

PAGE = 1000
FORMATS = ("npy", "jsonl", "parquet")
KEY = "embedding"
"""The name of a vector in JSON Lines and Parquet."""
Pages = Iterable[list[VectorRow]]


def resolve(session: Session, job_or_name: str) -> str:
    """The job id of backfill ``job_or_name``, or ``job_or_name`` itself when it is a job."""
    job_id = backfills.job_of(session, job_or_name)
    if job_id is None:
        raise InputError(f"{job_or_name!r} is neither a backfill name nor a job id in the store")
    return job_id


def pages(database_url: str, job_id: str) -> Iterator[list[VectorRow]]:
    """A job's rows, ``PAGE`` at a time, in input order, read as they are consumed."""
    with scope(sessions_for(database_url)) as session:
        yield from embeddings.stream_vectors(session, job_id, PAGE)


def npy_header(count: int, dim: int) -> bytes:
    """The npy format 1.0 preamble of a ``count`` x ``dim`` float32 matrix, as numpy writes
    it."""
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (count, dim)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def npy_chunks(rows: Pages, count: int, dim: int) -> Iterator[bytes]:
    """A ``count`` x ``dim`` npy file: the header, then each page's vectors."""
    yield npy_header(count, dim)
    for page in rows:
        yield b"".join(vector for _, _, vector in page)


def jsonl_chunks(rows: Pages) -> Iterator[bytes]:
    """JSON Lines, one ``{"id", "embedding"}`` per row, a page at a time."""
    for page in rows:
        yield "".join(
            json.dumps({"id": item_id, KEY: np.frombuffer(vector, "<f4").tolist()}) + "\n"
            for item_id, _, vector in page
        ).encode()


def export(database_url: str, job_or_name: str, fmt: str, out: Path) -> int:
    """Write the vectors of a job (or a backfill's job) to ``out``; returns the rows written."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: choose one of {FORMATS}")
    with scope(sessions_for(database_url)) as session:
        job_id = resolve(session, job_or_name)
        count, dim = embeddings.count_vectors(session, job_id)
    if not count or dim is None:
        raise InputError(f"job {job_id} has no stored vectors yet")
    counted = _Counted(pages(database_url, job_id))
    if fmt == "npy":
        ids_path = out.with_name(out.name + ".ids.txt")
        with out.open("wb") as handle, ids_path.open("w", encoding="utf-8") as ids:
            for chunk in npy_chunks(counted.noting(ids), count, dim):
                handle.write(chunk)
        if counted.rows != count:  # rows arrived while exporting: the header would lie
            raise InputError(
                f"the job changed while exporting ({counted.rows} rows, not {count}): retry"
            )
    elif fmt == "jsonl":
        with out.open("wb") as handle:
            for chunk in jsonl_chunks(counted):
                handle.write(chunk)
    else:
        _parquet(counted, out, dim)
    return counted.rows


class _Counted:
    """Pages passed through, their rows counted (and their ids written, for ``npy``)."""

    def __init__(self, rows: Iterator[list[VectorRow]]) -> None:
        self._rows = rows
        self.rows = 0

    def __iter__(self) -> Iterator[list[VectorRow]]:
        for page in self._rows:
            self.rows += len(page)
            yield page

    def noting(self, ids: TextIO) -> Iterator[list[VectorRow]]:
        for page in self:
            ids.write("".join(item_id + "\n" for item_id, _, _ in page))
            yield page


def _parquet(rows: Pages, out: Path, dim: int) -> None:
    try:  # pyarrow is an optional extra, imported when Parquet is asked for
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError("writing Parquet needs pyarrow: pip install 'embedq[parquet]'") from exc
    schema = pa.schema([("id", pa.string()), (KEY, pa.list_(pa.float32(), dim))])
    with pq.ParquetWriter(out, schema) as writer:
        for page in rows:
            matrix = np.frombuffer(b"".join(v for _, _, v in page), dtype=np.float32)
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix), dim)
            ids = pa.array([item_id for item_id, _, _ in page], pa.string())
            writer.write_table(pa.Table.from_arrays([ids, vectors], schema=schema))
