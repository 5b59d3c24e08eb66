"""How one delivery of a batch ended: what ``tasks.batches`` and the feeder return, what the
``embed`` task hands Flower (``Outcome.summary``), and whether it settled its job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum

from tasks.completion import JobStatus


class Delivery(StrEnum):
    """How one delivery of a batch ended."""

    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    """It had ended before (a redelivery)."""
    RETRYING = "retrying"
    DROPPED = "dropped"
    """A message without a job to record it in."""


@dataclass(frozen=True)
class Outcome:
    """How one delivery of a batch ended; the task returns it as a dict for Flower."""

    job_id: str | None
    batch: int | None
    state: Delivery
    finished: bool = False
    """True when this delivery settled the job (its completion is then signalled)."""
    texts: int = 0
    tokens: int = 0
    ms: float = 0.0
    provider: str = ""
    reason: str | None = None
    status: JobStatus | None = field(default=None, compare=False)
    """The job's final status when this delivery finished it: its completion signal carries
    it, so the waiting client need not read the job again."""

    def summary(self) -> dict[str, object]:
        return {
            key: str(value) if key == "state" else value
            for key, value in asdict(self).items()
            if value not in (None, "", 0) and key != "status"
        }
