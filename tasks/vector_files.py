"""Writing a job's vectors out, streamed: rows come from the store in pages and go straight to
the file, so exporting a million vectors needs the memory of one page.

Formats: ``npy`` (a float32 matrix in input order, ids beside it in ``PATH.ids.txt``), ``jsonl``
(``{"id": ..., "vector": [...]}`` per line), ``parquet`` (columns ``id`` and ``vector``, with
pyarrow installed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from storage import backfills, vectors
from storage.session import scope, sessions_for
from storage.vectors import VectorRow
from worker.errors import InputError

PAGE = 1000
FORMATS = ("npy", "jsonl", "parquet")
Pages = Iterator[list[VectorRow]]


def resolve(session: Session, job_or_name: str) -> str:
    """The job id of backfill ``job_or_name``, or ``job_or_name`` itself when it is a job."""
    job_id = backfills.job_of(session, job_or_name)
    if job_id is None:
        raise InputError(f"{job_or_name!r} is neither a backfill name nor a job id in the store")
    return job_id


def export(database_url: str, job_or_name: str, fmt: str, out: Path) -> int:
    """Write the vectors of a job (or a backfill's job) to ``out``; returns the rows written."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: choose one of {FORMATS}")
    with scope(sessions_for(database_url)) as session:
        job_id = resolve(session, job_or_name)
        count, dim = vectors.count_vectors(session, job_id)
        if not count or dim is None:
            raise InputError(f"job {job_id} has no stored vectors yet")
        pages = vectors.stream_vectors(session, job_id, PAGE)
        if fmt == "npy":
            return _npy(pages, out, count, dim)
        if fmt == "jsonl":
            return _jsonl(pages, out)
        return _parquet(pages, out, dim)


def _npy(pages: Pages, out: Path, count: int, dim: int) -> int:
    written = 0
    ids_path = out.with_name(out.name + ".ids.txt")
    with out.open("wb") as handle, ids_path.open("w", encoding="utf-8") as ids:
        header = {"descr": "<f4", "fortran_order": False, "shape": (count, dim)}
        np.lib.format.write_array_header_1_0(handle, header)
        for page in pages:
            for item_id, _, vector in page:
                handle.write(vector)
                ids.write(item_id + "\n")
                written += 1
    if written != count:  # rows arrived while exporting: the header would lie
        raise InputError(f"the job changed while exporting ({written} rows, not {count}): retry")
    return written


def _jsonl(pages: Pages, out: Path) -> int:
    written = 0
    with out.open("w", encoding="utf-8") as handle:
        for page in pages:
            for item_id, _, vector in page:
                values = np.frombuffer(vector, dtype=np.float32).tolist()
                handle.write(json.dumps({"id": item_id, "vector": values}) + "\n")
                written += 1
    return written


def _parquet(pages: Pages, out: Path, dim: int) -> int:
    try:  # pyarrow is an optional extra, imported when Parquet is asked for
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError("writing Parquet needs pyarrow: pip install 'embedq[parquet]'") from exc
    schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dim))])
    written = 0
    with pq.ParquetWriter(out, schema) as writer:
        for page in pages:
            matrix = np.frombuffer(b"".join(v for _, _, v in page), dtype=np.float32)
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix), dim)
            ids = pa.array([item_id for item_id, _, _ in page], pa.string())
            writer.write_table(pa.Table.from_arrays([ids, vectors], schema=schema))
            written += len(page)
    return written
