"""Which model file made a job's vectors: the sha256 of the ONNX file (its manifest's), recorded
by the worker in the transaction that stores a batch.

A job's ``model_sha256`` is the first file that embedded any of its batches. A fleet whose hosts
hold different files under one model name can embed later batches with another file: that is
never recorded silently over the first, but added to the job's ``meta["other_model_sha256"]``
(each file once), and the worker logs a warning. ``model_files`` lists them all, first first.

Functions take the session first and never commit. The lookup every batch
runs is one primary-key read; the job row is written only by the batch that meets a new file.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from storage.models import Job

OTHER_FILES = "other_model_sha256"

_jobs: Any = Job.__table__
_FIRST = select(_jobs.c.model_sha256).where(_jobs.c.id == bindparam("job"))
_SET_FIRST = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("job"), _jobs.c.model_sha256.is_(None))
    .values(model_sha256=bindparam("sha"))
)


def record_model_file(session: Session, job_id: str, sha256: str) -> str | None:
    """Record that a batch of ``job_id`` was embedded by the model file ``sha256``: the job's
    first file when it has none yet, else one of its other files when it differs. Returns the
    job's first file when ``sha256`` is another one (the caller warns), else ``None``."""
    connection = session.connection()
    params = {"job": job_id, "sha": sha256}
    first = connection.execute(_FIRST, params).scalar()
    if first is None:
        if connection.execute(_SET_FIRST, params).rowcount == 1:
            return None
        first = connection.execute(_FIRST, params).scalar()  # set by another batch meanwhile
    if first is None or first == sha256:  # no such job, or the job's own file
        return None
    job = session.get(Job, job_id, with_for_update=True)
    if job is not None:
        others = list(job.meta.get(OTHER_FILES, []))
        if sha256 not in others:
            job.meta = {**job.meta, OTHER_FILES: [*others, sha256]}
    return str(first)


_FILES = select(_jobs.c.id, _jobs.c.model_sha256).where(
    _jobs.c.id.in_(bindparam("jobs", expanding=True))
)
_SET_FIRSTS = (
    update(_jobs)
    .where(_jobs.c.id.in_(bindparam("jobs", expanding=True)), _jobs.c.model_sha256.is_(None))
    .values(model_sha256=bindparam("sha"))
)


def record_model_files(session: Session, files: dict[str, str]) -> dict[str, str]:
    """``record_model_file`` for many jobs (``files``: job id -> the file that embedded its
    batch): one read of their files and one write per file for the jobs that have none yet.
    Returns, by job, the first file of each job whose file differs (the caller warns); only
    those take ``record_model_file``'s slower path."""
    if not files:
        return {}
    connection = session.connection()
    found = {str(job): sha for job, sha in connection.execute(_FILES, {"jobs": list(files)})}
    unset: dict[str, list[str]] = {}
    for job, sha in files.items():
        if job in found and found[job] is None:
            unset.setdefault(sha, []).append(job)
    for sha, jobs in unset.items():
        connection.execute(_SET_FIRSTS, {"jobs": jobs, "sha": sha})
    others = {}
    for job, sha in files.items():
        if found.get(job) not in (None, sha):
            first = record_model_file(session, job, sha)
            if first is not None:
                others[job] = first
    return others


def model_files(job: Job) -> list[str]:
    """The sha256 of every model file that embedded batches of ``job``, the first first."""
    first = [job.model_sha256] if job.model_sha256 else []
    return first + [str(sha) for sha in job.meta.get(OTHER_FILES, [])]


def files_of_jobs(session: Session, job_ids: Collection[str]) -> set[str]:
    """The first model files of these jobs (those that have one): where vectors copied from
    them were made."""
    if not job_ids:
        return set()
    found = session.scalars(
        select(Job.model_sha256).where(Job.id.in_(set(job_ids)), Job.model_sha256.is_not(None))
    )
    return {str(sha) for sha in found}
