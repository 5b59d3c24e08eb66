"""A job's vectors as files (``tasks.vector_files``), the one set of encoders the CLI's
``export`` and the API's ``GET /v1/jobs/{id}/embeddings`` share: npy bytes that numpy loads back
to the same matrix, JSON Lines of ``{"id", "embedding"}``, and Parquet with an ``embedding``
column, written page by page from a SQLite store."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from storage import embeddings
from storage.embeddings import VectorRow
from storage.models import Job
from storage.session import dispose_all, scope, sessions_for
from tasks import vector_files
from worker.errors import InputError

IDS = [f"doc-{i}" for i in range(7)]
DIM = 5


def matrix(count: int = len(IDS), dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((count, dim)).astype(np.float32)


def paged(ids: list[str], vectors: np.ndarray, size: int) -> list[list[VectorRow]]:
    """The rows as the store hands them over: ``size`` at a time."""
    pairs = zip(ids, vectors, strict=True)
    rows = [(item, vectors.shape[1], vector.tobytes()) for item, vector in pairs]
    return [rows[start : start + size] for start in range(0, len(rows), size)]


@pytest.mark.parametrize("page", [1, 3, 7])
def test_npy_chunks_load_back_with_numpy_to_the_same_matrix(page: int) -> None:
    vectors = matrix()
    data = b"".join(vector_files.npy_chunks(paged(IDS, vectors, page), len(IDS), DIM))
    loaded = np.load(io.BytesIO(data))
    assert loaded.dtype == np.dtype("<f4") and loaded.shape == (len(IDS), DIM)
    np.testing.assert_array_equal(loaded, vectors)


def test_the_npy_header_is_the_one_numpy_writes() -> None:
    written = io.BytesIO()
    np.save(written, np.zeros((1234, 384), dtype="<f4"))
    header = vector_files.npy_header(1234, 384)
    assert written.getvalue()[: len(header)] == header
    assert len(header) % 64 == 0  # numpy aligns the data that follows


@pytest.mark.parametrize("page", [1, 4])
def test_jsonl_chunks_carry_an_id_and_an_embedding_per_line_in_order(page: int) -> None:
    vectors = matrix()
    text = b"".join(vector_files.jsonl_chunks(paged(IDS, vectors, page))).decode()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    assert [set(line) for line in lines] == [{"id", "embedding"}] * len(IDS)
    assert [line["id"] for line in lines] == IDS
    np.testing.assert_array_equal(np.array([line["embedding"] for line in lines], "f4"), vectors)


def test_nothing_in_gives_nothing_out() -> None:
    assert list(vector_files.jsonl_chunks([])) == []
    empty = b"".join(vector_files.npy_chunks([], 0, DIM))
    assert np.load(io.BytesIO(empty)).shape == (0, DIM)


# --- export, from the store -----------------------------------------------------------------------
@pytest.fixture
def job(sqlite_url: str) -> Iterator[tuple[str, np.ndarray]]:
    """A job of seven stored vectors, stored out of order (positions carry the order)."""
    vectors = matrix()
    rows = [
        {
            "job_id": "job-1",
            "item_id": item,
            "position": position,
            "text_sha256": hashlib.sha256(item.encode()).hexdigest(),
            "dim": DIM,
            "vector": vectors[position].tobytes(),
            "token_count": 3,
            "truncated": False,
        }
        for position, item in enumerate(IDS)
    ]
    with scope(sessions_for(sqlite_url)) as session:
        for job_id in ("job-1", "job-empty"):
            session.add(Job(id=job_id, model_name="m", queue="bulk", total_items=7, meta={}))
        session.flush()
        embeddings.upsert_embeddings(session, rows[::-1])
    yield sqlite_url, vectors
    dispose_all()


def test_export_writes_npy_with_the_ids_beside_it(
    job: tuple[str, np.ndarray], tmp_path: Path
) -> None:
    url, vectors = job
    out = tmp_path / "vectors.npy"
    assert vector_files.export(url, "job-1", "npy", out) == len(IDS)
    np.testing.assert_array_equal(np.load(out), vectors)
    assert (tmp_path / "vectors.npy.ids.txt").read_text().splitlines() == IDS


def test_export_writes_jsonl_under_the_embedding_key(
    job: tuple[str, np.ndarray], tmp_path: Path
) -> None:
    url, vectors = job
    out = tmp_path / "vectors.jsonl"
    assert vector_files.export(url, "job-1", "jsonl", out) == len(IDS)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["id"], set(line)) for line in lines] == [(i, {"id", "embedding"}) for i in IDS]
    np.testing.assert_array_equal(np.array([line["embedding"] for line in lines], "f4"), vectors)


def test_export_writes_parquet_with_an_embedding_column(
    job: tuple[str, np.ndarray], tmp_path: Path
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    url, vectors = job
    out = tmp_path / "vectors.parquet"
    assert vector_files.export(url, "job-1", "parquet", out) == len(IDS)
    table = pq.read_table(out)
    assert table.column_names == ["id", "embedding"]
    assert table.column("id").to_pylist() == IDS
    np.testing.assert_array_equal(
        np.array(table.column("embedding").to_pylist(), dtype=np.float32), vectors
    )


@pytest.mark.parametrize(
    ("job_id", "fmt", "says"),
    [
        ("job-1", "csv", "unknown format 'csv'"),
        ("no-such-job", "npy", "neither a backfill name nor a job id"),
        ("job-empty", "npy", "job job-empty has no stored vectors yet"),
    ],
)
def test_export_refuses_what_it_cannot_write_and_writes_nothing(
    job: tuple[str, np.ndarray], tmp_path: Path, job_id: str, fmt: str, says: str
) -> None:
    url, _ = job
    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(InputError, match=says):
        vector_files.export(url, job_id, fmt, folder / "out")
    assert list(folder.iterdir()) == []
