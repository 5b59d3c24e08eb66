"""A backfill's dry run: what a run would do, and how long it would take, before anything is
sent (``embedq backfill NAME --source SRC --dry-run``).

The source is read and compared with the store as a run would (``tasks.backfill.compare``):
unchanged, new, changed and removed ids, and the texts the content cache would copy. What is
left to embed is counted in texts, batches (as the run cuts them) and tokens, with the model's
own tokenizer (from this machine's model store; without it, characters / 4, and the estimate
says so). The time is those tokens over the rate the fleet ran this model at in its most recent
job of at least ``RATE_TEXTS`` texts (its tokens over the span its batches took, all its worker
processes together), read from ``batch_stats``; with no such job, a short probe runs some of
the texts through the model on this machine (``tasks.backfill.probe``) and the estimate says so;
where that cannot run either, no time is given and the estimate says why. Nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from sqlalchemy.orm import Session, sessionmaker

from storage import backfills, batch_stats, embeddings, ledger
from storage.session import scope, sessions_for
from tasks.backfill import probe, versions
from tasks.backfill.chunks import chunks, text_sha
from tasks.backfill.compare import compare
from tasks.backfill.options import Limits, Options
from tasks.backfill.readers import Reader
from worker.errors import ModelError
from worker.settings import Settings

RATE_TEXTS = 1000
"""The fewest texts a job must have run for its rate to stand for the fleet's."""
CHARS_PER_TOKEN = 4
"""The tokens assumed per character when the model's tokenizer is not on this machine."""


@dataclass(frozen=True)
class Estimate:
    """What a run would do and take; ``--json`` prints ``as_json()``."""

    model: str
    version: int | None
    """The collection version the run would sync; ``None``: it would build a new one."""
    current: int | None
    """The version readers get now (``None``: a new collection)."""
    rows: int
    unchanged: int
    new: int
    changed: int
    removed: int
    duplicates: int
    unusable: int
    cached: int
    texts: int
    """Texts to embed: new and changed, less the unusable and those the cache would copy."""
    batches: int
    tokens: int
    tokens_by: str
    """How ``tokens`` was counted: the model's tokenizer, or characters / 4."""
    tokens_per_s: float | None
    seconds: float | None
    assumption: str
    """Where the rate comes from, or why there is none."""

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def dry_run(
    reader: Reader,
    options: Options,
    settings: Settings,
    *,
    sessions: sessionmaker[Session] | None = None,
) -> Estimate:
    """Read ``reader`` as a run of ``options`` would, and say what it would do and take."""
    sessions = sessions or sessions_for(settings.database_url)
    limits = Limits.of(options, settings)
    with scope(sessions) as session:
        aim = versions.target(session, options, settings)
    count, tokens_by = token_counter(settings, aim.model)
    counts = {"rows": 0, "unchanged": 0, "new": 0, "changed": 0, "duplicates": 0}
    unusable = cached = texts = batches = tokens = 0
    seen: set[str] = set()
    met: set[str] = set()
    sample = probe.Sample()
    """Texts to embed, for a probe when the fleet has no rate for the model."""
    with scope(sessions) as session:
        job_id, model_file = aim.job_id, aim.model_file
        in_flight = set()
        if job_id is not None:
            for batch in ledger.pending_batches(session, job_id):
                in_flight.update(batch.item_ids)
        for chunk in chunks(reader.rows(), limits.batch_size, limits.batch_chars):
            ids = [row.item_id for row in chunk]
            met.update(ids)
            stored: dict[str, str | None] = {}
            known = in_flight.intersection(ids)
            if job_id is not None:
                stored = {i: sha for i, _, sha in backfills.stored_items(session, job_id, ids)}
                known |= {i for i, _ in backfills.failed_items(session, job_id, ids)}
            row = compare(chunk, stored, known, seen)
            counts["rows"] += len(chunk)
            counts["unchanged"] += row.unchanged
            counts["new"] += row.new
            counts["changed"] += len(row.changed)
            counts["duplicates"] += row.duplicates
            unusable += sum(map(len, row.failures.values()))
            hashes = {r.item_id: text_sha(r.text) for r in row.fresh}
            copies = (
                embeddings.cached_vectors(session, model_file, list(hashes.values()))
                if model_file and hashes
                else {}
            )
            send = [r for r in row.fresh if hashes[r.item_id] not in copies]
            sample.offer(r.text for r in send)
            cached += len(row.fresh) - len(send)
            if send:
                batches += 1
                texts += len(send)
                tokens += sum(count(r.text) for r in send)
        removed = 0
        if job_id is not None:
            removed = sum(
                1
                for item in backfills.held_items(session, job_id)
                if item not in met and item not in in_flight
            )
        rate, assumption = fleet_rate(session, aim.model)
    if rate is None and sample.texts:
        rate, measured = probe.probe_rate(settings, aim.model, sample.texts)
        assumption = measured if rate is not None else f"{assumption}; no probe here: {measured}"
    return Estimate(
        model=aim.model,
        version=aim.version,
        current=aim.current,
        **counts,
        removed=removed,
        unusable=unusable,
        cached=cached,
        texts=texts,
        batches=batches,
        tokens=tokens,
        tokens_by=tokens_by,
        tokens_per_s=rate,
        seconds=None if rate is None else round(tokens / rate, 1),
        assumption=assumption,
    )


def token_counter(settings: Settings, model: str) -> tuple[Callable[[str], int], str]:
    """How to count a text's tokens as the model runs it (truncated at its length): its own
    tokenizer from this machine's model store, else characters / ``CHARS_PER_TOKEN``."""
    from worker.manifest import TOKENIZER_FILE, Manifest

    folder = settings.model_dir / model
    try:
        manifest = Manifest.read(folder)
        from worker.engine import load_tokenizer

        tokenizer = load_tokenizer(folder / TOKENIZER_FILE, manifest.behaviour.max_seq_length)
    except (OSError, ModelError):
        return (
            lambda text: max(1, len(text) // CHARS_PER_TOKEN),
            f"characters / {CHARS_PER_TOKEN}: model {model!r} is not in {settings.model_dir}",
        )
    return (lambda text: len(tokenizer.encode(text).ids)), f"the tokenizer of {model}"


def fleet_rate(session: Session, model: str) -> tuple[float | None, str]:
    """Tokens per second the fleet ran ``model`` at in its most recent job of at least
    ``RATE_TEXTS`` texts, and where that figure comes from (or why there is none)."""
    recent = batch_stats.recent_rate(session, model, RATE_TEXTS)
    if recent is None:
        return None, f"no job of model {model!r} has run {RATE_TEXTS:,} texts yet: no rate known"
    job_id, tokens, span = recent
    rate = tokens / span
    return rate, (
        f"the fleet as it ran job {job_id}: {tokens:,} tokens in {span:.1f} s"
        f" ({rate:,.0f} tokens/s, all its worker processes together)"
    )
