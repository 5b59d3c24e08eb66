"""The content cache: vectors a backfill copies instead of running the model again, keyed by the
sha256 of the model file that made them and of the text.

A model's name says nothing of its file: pulled again under the same name from a new revision,
it makes other vectors for the same text. So a run first settles which file the fleet runs as
the model (``current_file``: the one every host that has it ready recorded; in local mode, this
machine's model store's), and copies only vectors that file made. When the hosts disagree, or
none has the model yet, nothing is copied: the model runs (one log line says why).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session

from storage import backfills, embeddings, jobs, model_catalog, model_files
from storage.models import Embedding
from tasks.backfill.readers import Row
from worker.errors import ModelError
from worker.settings import Settings

logger = logging.getLogger(__name__)


def current_file(session: Session, model: str, settings: Settings) -> str | None:
    """The sha256 of the ONNX file the fleet runs as ``model``, or ``None`` when that cannot be
    told (the hosts disagree, or none has it ready)."""
    files = model_catalog.ready_files(session, model)
    if not files and settings.local_mode:  # this process runs it: its own model store says
        from worker.manifest import Manifest

        try:
            files = {Manifest.read(settings.model_dir / model).onnx_sha256}
        except (OSError, ModelError):
            files = set()
    if len(files) == 1:
        return files.pop()
    logger.info(
        "no vectors are copied from the content cache for model %s: %s",
        model,
        f"its hosts run {len(files)} different files" if files else "no host has it ready yet",
        extra={"model": model},
    )
    return None


@dataclass(frozen=True)
class Copied:
    """Rows whose vector was copied from the cache, and the jobs it was copied from."""

    rows: list[Row]
    sources: set[str]


def copy_cached(
    session: Session,
    job_id: str,
    model_file: str | None,
    rows: list[Row],
    hashes: dict[str, str],
) -> Copied:
    """Copy into ``job_id`` the vector ``model_file`` made of each row's text (``hashes``: the
    text sha256 by item id), where the store holds one, and count them done and reused."""
    if model_file is None or not rows:
        return Copied([], set())
    cached = embeddings.cached_vectors(session, model_file, list(hashes.values()))
    reuse = [row for row in rows if hashes[row.item_id] in cached]
    copies = [_copy(job_id, row, hashes[row.item_id], cached[hashes[row.item_id]]) for row in reuse]
    reused = len(embeddings.upsert_embeddings(session, copies))
    if reused:
        jobs.add_progress(session, job_id, done=reused, failed=0, error=None)
        backfills.add_reused(session, job_id, reused)
        first = model_files.record_model_file(session, job_id, model_file)
        if first is not None:
            logger.warning(
                "vectors copied from another model file: job=%s file=%s job's file=%s",
                job_id,
                model_file,
                first,
                extra={"job": job_id},
            )
    return Copied(reuse, {cached[hashes[row.item_id]].job_id for row in reuse})


def _copy(job_id: str, row: Row, sha: str, cached: Embedding) -> dict[str, object]:
    return {
        "job_id": job_id,
        "item_id": row.item_id,
        "position": row.position,
        "text_sha256": sha,
        "dim": cached.dim,
        "vector": cached.vector,
        "token_count": cached.token_count,
        "truncated": cached.truncated,
    }
