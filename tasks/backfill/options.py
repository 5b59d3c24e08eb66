"""What a backfill run is told (its options, settled against the settings), what it reports
(its progress), and how it can fail."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from worker.errors import EmbedqError
from worker.settings import Settings

T = TypeVar("T")

BATCH_CHARS = 128 * 2000
"""Characters per batch at most (a batch of long texts is cut before ``batch_size`` rows)."""


class BackfillError(EmbedqError):
    """A backfill that cannot start or go on (a different model under the same name, ...)."""


@dataclass(frozen=True)
class Options:
    """What one run of a backfill does. A limit left ``None`` is the setting's:
    ``EMBEDQ_BULK_BATCH_SIZE`` (else ``EMBEDQ_JOB_BATCH_SIZE``), ``EMBEDQ_BACKFILL_MAX_IN_FLIGHT``,
    ``EMBEDQ_STUCK_AFTER``."""

    name: str
    model: str | None = None
    """``None``: the collection's current model, else ``EMBEDQ_DEFAULT_MODEL``; another one than
    the current builds a new version (``tasks.backfill.versions``)."""
    batch_size: int | None = None
    batch_chars: int = BATCH_CHARS
    max_in_flight: int | None = None
    stuck_after: float | None = None
    retry_failed: bool = False
    prune: bool = False
    """Remove what the store holds of ids the source no longer has (else: counted, listed)."""
    searchable: bool = True
    """Whether a new version keeps a vector index where the store can (an OpenAI batch's output
    is read, never searched: it keeps none)."""


@dataclass(frozen=True)
class Limits:
    """A run's limits, every one settled: its options, else the settings."""

    batch_size: int
    batch_chars: int
    max_in_flight: int
    stuck_after: float
    sweep_interval: float

    @classmethod
    def of(cls, options: Options, settings: Settings) -> Limits:
        return cls(
            batch_size=_given_or(options.batch_size, settings.batch_size_for("bulk")),
            batch_chars=options.batch_chars,
            max_in_flight=_given_or(options.max_in_flight, settings.backfill_max_in_flight),
            stuck_after=_given_or(options.stuck_after, settings.stuck_after),
            sweep_interval=settings.sweep_interval,
        )


def _given_or(value: T | None, setting: T) -> T:
    return setting if value is None else value


REMOVED_SHOWN = 10
"""Removed ids a sync lists."""


@dataclass
class Sync:
    """What a run found, id by id, against what the store held: the counts of a sync."""

    unchanged: int = 0
    """Stored with the same text (its sha256), failed before, or in a batch still in flight."""
    new: int = 0
    """Ids the store held nothing of."""
    changed: int = 0
    """Ids stored with another text: their vectors are dropped and made again."""
    removed: int = 0
    """Ids the store holds that the source no longer has."""
    pruned: bool = False
    """Whether the removed ids were deleted (``--prune``) or only counted."""
    removed_examples: list[str] = field(default_factory=list)
    """Some of the removed ids (``REMOVED_SHOWN``)."""


@dataclass
class BackfillProgress:
    """What the producer knows now; the CLI draws it."""

    job_id: str
    total: int | None
    version: int = 1
    """The collection version this run syncs."""
    current: bool = True
    """Whether readers get that version (else it is built beside the one they get)."""
    sent: int = 0
    reused: int = 0
    failed_here: int = 0
    skipped: int = 0
    """Items already stored with the same text, failed or in a pending batch when this run
    met them (``sync.unchanged``)."""
    duplicates: int = 0
    """Rows whose id this run had already met (repeated in the source): skipped."""
    batches: int = 0
    done: int = 0
    failed: int = 0
    tokens: int = 0
    in_flight: int = 0
    finished: bool = False
    sync: Sync = field(default_factory=Sync)


Report = Callable[[BackfillProgress], None]
