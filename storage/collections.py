"""Queries of a collection's versions: the backfill's corpus under one model file each, one
job per version, and which one readers get (the backfill's ``job_id``).

Functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from storage import vector_index
from storage.models import Backfill, CollectionVersion, Job


class CollectionError(Exception):
    """Raised for a version that does not exist, or one that cannot be dropped."""


def list_versions(session: Session, name: str) -> Sequence[CollectionVersion]:
    return session.scalars(
        select(CollectionVersion)
        .where(CollectionVersion.name == name)
        .order_by(CollectionVersion.version)
    ).all()


def version_of_job(session: Session, job_id: str) -> CollectionVersion | None:
    return session.scalar(select(CollectionVersion).where(CollectionVersion.job_id == job_id))


def get_version(session: Session, name: str, version: int) -> CollectionVersion:
    found = session.get(CollectionVersion, (name, version))
    if found is None:
        known = [v.version for v in list_versions(session, name)]
        raise CollectionError(
            f"collection {name!r} has no version {version}"
            + (f" (it has {', '.join(map(str, known))})" if known else " (no such collection)")
        )
    return found


def file_of(session: Session, version: CollectionVersion) -> str | None:
    """The model file that made ``version``'s vectors: the one it was made for, else the one its
    workers recorded on its job."""
    if version.model_sha256 is not None:
        return version.model_sha256
    return session.scalar(select(Job.model_sha256).where(Job.id == version.job_id))


def find_version(
    session: Session, name: str, model: str, model_file: str | None
) -> CollectionVersion | None:
    """The version of ``name`` a run with ``model`` syncs: the newest one of that model whose
    file is ``model_file`` (or not known); with ``model_file`` not known, the newest one of the
    model. ``None``: the run builds a new version."""
    for version in reversed(list_versions(session, name)):
        if version.model_name != model:
            continue
        made_by = file_of(session, version)
        if model_file is None or made_by is None or made_by == model_file:
            return version
    return None


def add_version(
    session: Session,
    name: str,
    job_id: str,
    model: str,
    model_sha256: str | None,
    indexed: bool = True,
) -> CollectionVersion:
    """Record ``job_id`` as the next version of collection ``name`` (with ``indexed``, its
    vector index planned where the store can keep one)."""
    last = session.scalar(
        select(func.coalesce(func.max(CollectionVersion.version), 0)).where(
            CollectionVersion.name == name
        )
    )
    version = CollectionVersion(
        name=name,
        version=int(last or 0) + 1,
        job_id=job_id,
        model_name=model,
        model_sha256=model_sha256,
    )
    if indexed:
        vector_index.plan(session, version)
    session.add(version)
    session.flush()
    return version


def current_version(session: Session, name: str) -> CollectionVersion | None:
    """The version readers of ``name`` get (``None``: no such collection)."""
    return session.scalar(
        select(CollectionVersion)
        .join(Backfill, Backfill.job_id == CollectionVersion.job_id)
        .where(Backfill.name == name)
    )


def use_version(session: Session, name: str, version: int) -> CollectionVersion:
    """Make ``version`` the one readers of ``name`` get, in one row's update: a reader that
    resolved the collection before keeps reading the version it resolved. A version whose run
    has not ended (its job unsealed or running) is refused."""
    chosen = get_version(session, name, version)
    job = session.get(Job, chosen.job_id)
    if job is None or not job.sealed or job.finished_at is None:
        done = "" if job is None else f" ({job.done_items} vectors so far)"
        raise CollectionError(
            f"version {version} of {name!r} is still being built{done}: run its backfill to"
            " the end first, then `use` it"
        )
    backfill = session.get(Backfill, name, with_for_update=True)
    if backfill is None:
        raise CollectionError(f"no collection {name!r}")
    backfill.job_id = chosen.job_id
    backfill.model_name = chosen.model_name
    return chosen


def drop_version(session: Session, name: str, version: int) -> CollectionVersion:
    """Delete ``version`` of ``name``: its job (its vectors, batches, failures with it) and its
    vector index. The current version cannot be dropped."""
    chosen = get_version(session, name, version)
    current = current_version(session, name)
    if current is not None and current.version == version:
        raise CollectionError(
            f"version {version} is the one readers of {name!r} get: `use` another one first"
        )
    vector_index.drop(session, chosen.job_id)
    session.execute(delete(Job).where(Job.id == chosen.job_id))  # cascades to the version
    session.expunge(chosen)
    return chosen
