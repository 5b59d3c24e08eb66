"""Collections through the real CLI, ``embedq serve``, a worker and a store with a vector
extension: a migration to a second model (the int8 variant) while a reader exports and searches
the collection over HTTP in a loop, and search against an exact numpy search."""

from __future__ import annotations

import io
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from storage import collections, embeddings
from storage.session import scope, sessions_for
from tests.acceptance.conftest import KEY, Fleet
from tests.commands import embedq, embedq_json, write_jsonl
from tests.conftest import INT8_MODEL_NAME

AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass(frozen=True)
class Read:
    """One read of the collection by the reader: when it ran and what it got."""

    started: float
    ended: float
    kind: str
    version: int
    matrix: bytes = b""
    """An export's vectors."""
    model: str = ""
    """A search's model."""


def vectors_of(fleet: Fleet, name: str, version: int) -> tuple[list[str], np.ndarray]:
    with scope(sessions_for(fleet.database_url)) as session:
        job_id = collections.get_version(session, name, version).job_id
        rows = embeddings.list_vectors(session, job_id)
    ids = [row.item_id for row in rows]
    return ids, np.stack([np.frombuffer(row.vector, dtype=np.float32) for row in rows])


class Reader(threading.Thread):
    """Exports (``GET /v1/collections/docs/embeddings``) and searches (``POST .../search``)
    the collection in a loop until stopped; ``reads`` says after each read."""

    def __init__(self, url: str, query: str) -> None:
        super().__init__(daemon=True)
        self.url, self.query = url, query
        self.reads: list[Read] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.progress = threading.Condition()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    self._read(client)
                except Exception as error:  # the test reports it
                    self.failures.append(repr(error))
                    return

    def _read(self, client: httpx.Client) -> None:
        started = time.monotonic()
        got = client.get("/v1/collections/docs/embeddings", params={"format": "npy"})
        got.raise_for_status()
        export = Read(
            started,
            time.monotonic(),
            "export",
            int(got.headers["x-embedq-version"]),
            matrix=np.load(io.BytesIO(got.content)).tobytes(),
        )
        started = time.monotonic()
        found = client.post("/v1/collections/docs/search", json={"query": self.query, "k": 10})
        found.raise_for_status()
        body = found.json()
        search = Read(started, time.monotonic(), "search", body["version"], model=body["model"])
        with self.progress:
            self.reads += [export, search]
            self.progress.notify_all()

    def wait_for_reads_after(self, moment: float, count: int, timeout: float = 120) -> None:
        """Block until ``count`` reads started after ``moment`` have ended."""
        with self.progress:
            ok = self.progress.wait_for(
                lambda: self.failures or sum(r.started > moment for r in self.reads) >= count,
                timeout,
            )
        assert ok and not self.failures, self.failures


@pytest.mark.parametrize("fleet", ["pgvector"], indirect=True)
def test_a_migration_never_shows_a_reader_a_mix_of_versions_and_use_switches_it_at_once(
    fleet: Fleet, int8_model: Path, short_texts: list[str], tmp_path: Path
) -> None:
    rows = {f"d{i}": text for i, text in enumerate(dict.fromkeys(short_texts))}
    rows = dict(list(rows.items())[:1500])
    source = write_jsonl(tmp_path / "docs.jsonl", rows)
    first = embedq_json(fleet.env, "backfill", "docs", "--source", str(source))
    assert (first["version"], first["done"]) == (1, len(rows))

    reader = Reader(fleet.serve().url, short_texts[-1])
    reader.start()
    try:
        reader.wait_for_reads_after(0, 2)
        migrated = embedq_json(
            fleet.env, "backfill", "docs", "--source", str(source), "--model", INT8_MODEL_NAME
        )
        assert (migrated["version"], migrated["done"], migrated["state"]) == (
            2,
            len(rows),
            "succeeded",
        )
        built = time.monotonic()
        reader.wait_for_reads_after(built, 2)  # the new version is whole: still not read
        before_use = time.monotonic()
        embedq(fleet.env, "collection", "docs", "use", "2")
        after_use = time.monotonic()
        reader.wait_for_reads_after(after_use, 4)
    finally:
        reader.stop.set()
        reader.join(120)
    assert not reader.failures, reader.failures

    ids1, v1 = vectors_of(fleet, "docs", 1)
    ids2, v2 = vectors_of(fleet, "docs", 2)
    assert ids1 == ids2 == list(rows)  # both versions in the source's order
    assert float(np.max(np.abs(v1 - v2))) > 1e-3  # the int8 model's vectors differ
    whole = {1: v1.tobytes(), 2: v2.tobytes()}
    models = {1: "minilm", 2: INT8_MODEL_NAME}
    exports = [r for r in reader.reads if r.kind == "export"]
    searches = [r for r in reader.reads if r.kind == "search"]
    for read in exports:  # never a mix: exactly one version's vectors, the one it names
        assert read.matrix == whole[read.version]
    for read in searches:
        assert read.model == models[read.version]
    assert all(r.version == 1 for r in reader.reads if r.ended < before_use)
    assert all(r.version == 2 for r in reader.reads if r.started > after_use)
    seen = [r.version for r in reader.reads]
    assert seen == sorted(seen)  # readers switch once, and never back
    print(
        f"reader: {len(exports)} exports and {len(searches)} searches during the migration;"
        f" {sum(r.version == 1 for r in reader.reads)} reads of version 1, then"
        f" {sum(r.version == 2 for r in reader.reads)} of version 2"
    )

    embedq(fleet.env, "collection", "docs", "drop", "1")
    listed = embedq_json(fleet.env, "collection", "docs")
    assert [(v["version"], v["current"]) for v in listed] == [(2, True)]


@pytest.mark.parametrize("fleet", ["pgvector", "sqlite"], indirect=True)
def test_search_returns_the_exact_top_10_with_its_latency(
    fleet: Fleet, corpus: list[str], engine: Any, tmp_path: Path
) -> None:
    texts = list(dict.fromkeys(t for t in corpus if 40 <= len(t) <= 400))
    rows = {f"p{i}": text for i, text in enumerate(texts[:3000])}
    queries = texts[3000:3030]
    source = write_jsonl(tmp_path / "pages.jsonl", rows)
    embedq_json(fleet.env, "backfill", "pages", "--source", str(source))
    ids, matrix = vectors_of(fleet, "pages", 1)
    expected = engine.encode(queries).vectors

    latencies, found = [], 0
    with httpx.Client(base_url=fleet.serve().url, headers=AUTH, timeout=60) as client:
        for query, vector in zip(queries, expected, strict=True):
            started = time.perf_counter()
            answer = client.post("/v1/collections/pages/search", json={"query": query, "k": 10})
            latencies.append((time.perf_counter() - started) * 1000)
            answer.raise_for_status()
            body = answer.json()
            assert body["indexed"] and body["version"] == 1
            exact = {ids[i] for i in np.argsort(-(matrix @ vector))[:10]}
            found += len({hit["id"] for hit in body["data"]} & exact)
        shown = client.get("/v1/collections/pages").json()
        assert (shown["version"], [(v["version"], v["indexed"]) for v in shown["versions"]]) == (
            1,
            [(1, True)],
        )
        unknown = client.post("/v1/collections/nope/search", json={"query": "x"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == (
            "collection_not_found"
        )
        refused = client.post("/v1/collections/pages/search", json={"query": "x", "k": 0})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "k"
    recall = found / (10 * len(queries))
    cli = embedq_json(fleet.env, "search", "pages", queries[0], "-k", "5")
    assert [h["item_id"] for h in cli["hits"]] == [
        ids[i] for i in np.argsort(-(matrix @ expected[0]))[:5]
    ]
    print(
        f"search on {fleet.dialect} over {len(rows)} vectors: recall@10 {recall:.3f} against"
        f" an exact numpy search; API latency p50 {statistics.median(latencies):.1f} ms,"
        f" max {max(latencies):.1f} ms; CLI search {cli['search_ms']} ms"
    )
    assert recall >= 0.95
