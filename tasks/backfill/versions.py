"""Which version of a collection a backfill run syncs: the current one, another one of the same
model file, or a new one (a migration to another model, or to a changed file of the same model),
built beside the current one while its readers keep it."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from storage import backfills, collections
from tasks.backfill import cache
from tasks.backfill.options import BackfillError, Options
from worker.settings import Settings


@dataclass(frozen=True)
class Target:
    """What a run of ``Options`` writes into."""

    model: str
    model_file: str | None
    """The model file the fleet runs as ``model`` (``None``: not known)."""
    job_id: str | None
    """The job of the version it syncs; ``None``: it makes a new version (or collection)."""
    version: int | None
    current: int | None
    """The version readers get now (``None``: a new collection)."""

    @property
    def builds_new_version(self) -> bool:
        return self.job_id is None and self.current is not None


def model_of(session: Session, options: Options, settings: Settings) -> str:
    """The model a run embeds with: ``--model``, else the collection's current one, else
    ``EMBEDQ_DEFAULT_MODEL``."""
    if options.model:
        return options.model
    found = backfills.get_backfill(session, options.name)
    if found is not None:
        return found.model_name
    if settings.default_model:
        return settings.default_model
    raise BackfillError("no --model given and EMBEDQ_DEFAULT_MODEL is not set")


def target(session: Session, options: Options, settings: Settings) -> Target:
    model = model_of(session, options, settings)
    model_file = cache.current_file(session, model, settings)
    current = collections.current_version(session, options.name)
    found = collections.find_version(session, options.name, model, model_file)
    return Target(
        model=model,
        model_file=model_file,
        job_id=None if found is None else found.job_id,
        version=None if found is None else found.version,
        current=None if current is None else current.version,
    )
