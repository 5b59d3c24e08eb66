"""Searching a collection: the query embedded through the pipeline (a one-text job on the
``interactive`` queue, run by the workers with the collection's model), then its nearest ids in
the collection's current version, by cosine.

The version is settled once (``collections.current_version``), so a search during
``embedq collection NAME use`` reads one version whole. Its vector index answers where it has one
(``storage.vector_index``: pgvector's HNSW, sqlite-vec); else the version's vectors are scanned
exactly, a page at a time (``exact``), and embedq says once how to get the index.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
from sqlalchemy.orm import Session

from storage import collections, embeddings, vector_extensions, vector_index
from storage.models import CollectionVersion, JobState
from storage.session import scope, sessions_for
from storage.vector_index import Hit
from tasks import names, producer
from tasks.publishing import Publisher
from worker.errors import EmbedqError, InputError
from worker.settings import Settings

MAX_K = 1000
"""The most ids one search returns (pgvector's HNSW keeps at most 1,000 candidates)."""
PAGE = 5000
"""Vectors an exact scan reads at a time."""


@dataclass(frozen=True)
class Found:
    """A search's answer: the version it read and its hits, best first."""

    collection: str
    version: int
    model: str
    hits: list[Hit]
    indexed: bool
    """Whether the version's vector index answered (else an exact scan did)."""
    embed_ms: float
    search_ms: float
    tokens: int

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def current(session: Session, name: str) -> CollectionVersion:
    """The version readers of collection ``name`` get; ``InputError`` when there is none."""
    version = collections.current_version(session, name)
    if version is None:
        raise InputError(f"no collection named {name!r} in the store")
    return version


def check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise InputError(f"k must be between 1 and {MAX_K}, not {k}")
    return k


def embed_query(
    query: str,
    model: str,
    settings: Settings,
    *,
    tag: str,
    publisher: Publisher | None = None,
    owner: str | None = None,
    priority: int = names.FIRST,
) -> producer.JobHandle:
    """Submit ``query`` as a one-text job on the interactive queue (``owner`` and ``priority``
    as ``producer.submit`` takes them: the API's key and its admission step)."""
    if not query.strip():
        raise InputError("the query is empty")
    return producer.submit(
        [query],
        model=model,
        queue=names.Queue.INTERACTIVE,
        tag=tag,
        settings=settings,
        publisher=publisher,
        owner=owner,
        priority=priority,
    )


def query_vector(handle: producer.JobHandle) -> tuple[np.ndarray, int]:
    """The finished query job's vector and its token count; ``EmbedqError`` with the job's
    reason when it failed."""
    status = handle.status()
    if status["state"] != JobState.SUCCEEDED:
        raise EmbedqError(f"the query could not be embedded: {status.get('error') or status}")
    with scope(sessions_for(handle.database_url)) as session:
        rows = embeddings.vectors_with_tokens(session, handle.id)
    return np.frombuffer(rows[0].vector, dtype="<f4"), int(rows[0].token_count)


def search(
    name: str,
    query: str,
    k: int,
    settings: Settings,
    *,
    publisher: Publisher | None = None,
    timeout: float = 60.0,
) -> Found:
    """The ``k`` ids of collection ``name`` nearest ``query`` (embedded by the workers)."""
    check_k(k)
    with scope(sessions_for(settings.database_url)) as session:
        version = current(session, name)
        session.expunge(version)
    started = time.perf_counter()
    handle = embed_query(
        query, version.model_name, settings, tag=f"search:{name}", publisher=publisher
    )
    handle.wait(timeout)
    vector, tokens = query_vector(handle)
    embedded = time.perf_counter()
    hits, indexed = nearest(settings.database_url, version.job_id, vector, k)
    return Found(
        collection=name,
        version=version.version,
        model=version.model_name,
        hits=hits,
        indexed=indexed,
        embed_ms=round((embedded - started) * 1000, 1),
        search_ms=round((time.perf_counter() - embedded) * 1000, 1),
        tokens=tokens,
    )


def nearest(database_url: str, job_id: str, query: np.ndarray, k: int) -> tuple[list[Hit], bool]:
    """The ``k`` ids of ``job_id`` nearest ``query``, best first, and whether an index found
    them."""
    with scope(sessions_for(database_url)) as session:
        hits = vector_index.nearest(session, job_id, query, k)
        if hits is not None:
            return hits, True
        vector_extensions.say_once(session.get_bind().dialect.name)
        return exact(session, job_id, query, k), False


def exact(session: Session, job_id: str, query: np.ndarray, k: int) -> list[Hit]:
    """The ``k`` ids of ``job_id`` nearest ``query`` by cosine, by scanning every vector."""
    unit = query / (np.linalg.norm(query) or 1.0)
    best_ids: list[str] = []
    best_scores = np.zeros(0, dtype=np.float32)
    for page in embeddings.stream_vectors(session, job_id, PAGE):
        matrix = np.frombuffer(b"".join(v for _, _, v in page), dtype="<f4").reshape(len(page), -1)
        norms = np.linalg.norm(matrix, axis=1)
        scores = (matrix @ unit) / np.where(norms == 0, 1.0, norms)
        ids = best_ids + [item for item, _, _ in page]
        merged = np.concatenate([best_scores, scores.astype(np.float32)])
        keep = np.argsort(-merged, kind="stable")[:k]
        best_ids, best_scores = [ids[i] for i in keep], merged[keep]
    return [Hit(item, float(score)) for item, score in zip(best_ids, best_scores, strict=True)]
