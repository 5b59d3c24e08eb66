"""The content cache: the first stored vector of a text under a model, by the text's sha256, so
a backfill that meets a text again copies its vector instead of running the model.

Functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage import dialect
from storage.models import CachedVector, Embedding


def _insert(session: Session) -> Any:
    insert: Any = dialect.upsert(session, CachedVector.__table__)
    return insert.on_conflict_do_nothing(index_elements=["model_name", "text_sha256"])


def cache_vectors(session: Session, model: str, stored: Sequence[tuple[int, str]]) -> None:
    """Remember the first vector of each text under ``model``; ``stored`` holds the (embedding
    row id, text sha256) of rows just inserted."""
    if stored:
        rows = [{"model_name": model, "text_sha256": h, "embedding_id": i} for i, h in stored]
        session.connection().execute(dialect.prepared(session, "cache", _insert), rows)


def cached_vectors(session: Session, model: str, hashes: Sequence[str]) -> dict[str, Embedding]:
    """Stored embeddings of these texts under ``model``, by text sha256."""
    if not hashes:
        return {}
    rows = session.execute(
        select(CachedVector.text_sha256, Embedding)
        .join(Embedding, Embedding.id == CachedVector.embedding_id)
        .where(CachedVector.model_name == model, CachedVector.text_sha256.in_(set(hashes)))
    ).all()
    return {sha: embedding for sha, embedding in rows}
