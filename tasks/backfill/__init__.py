"""Bulk backfills: a named, resumable job fed from a streamed source, with backpressure; run
again on the same source, a sync of the store to it.

``BackfillRun.run`` reads the source row by row and, per chunk of rows:
- skips items already stored in the job with the same text (its sha256), already failed
  (unless retrying them), or in a batch still in flight from an earlier run;
- drops the vector of an item stored with another text, which is then embedded again;
- copies the vector of any text the content cache already holds for the model file the fleet
  runs under the model's name (``tasks.backfill.cache``; counted as reused; the model does not
  run);
- records unusable rows (no id, no text, empty text) as failed items with their reason;
- sends the rest as one ``bulk`` batch, recorded in the batch ledger with its items and texts,
  after waiting until fewer than ``max_in_flight`` of the job's batches are unfinished.
The producer therefore holds one chunk and Redis at most ``max_in_flight`` messages of the job,
whatever the source's size. At the end it waits for the batches in flight, counts the ids the job
holds that the source no longer has (and with ``prune`` deletes them), then seals the job (its
total is the items accounted for) so its state settles. What the run found is its ``Sync``.

Batches are the same ledger rows every job has: a batch whose message is lost is re-published
by the reconciler in the workers (and failed after too many losses), so a resumed run (the same
name again) sends only what no batch holds: items neither stored, failed nor in a pending batch.
A publish that fails (the broker is down) stops the run with ``UnavailableError``; its batch is
already in the ledger, so the reconciler or the next run picks it up.
"""

from tasks.backfill.options import (
    BackfillError,
    BackfillProgress,
    Limits,
    Options,
    Report,
    Sync,
)
from tasks.backfill.run import BackfillRun
from tasks.backfill.summary import BackfillSummary, WorkerShare, summary

__all__ = [
    "BackfillError",
    "BackfillProgress",
    "BackfillRun",
    "BackfillSummary",
    "Limits",
    "Options",
    "Report",
    "Sync",
    "WorkerShare",
    "summary",
]
