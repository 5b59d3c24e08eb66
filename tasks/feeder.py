"""The feeder: one engine fed by many batches at once, so that it never waits for SQL or the
broker, and many small jobs make one engine call.

A worker that holds several batches at a time (``EMBEDQ_IN_FLIGHT`` > 1, the default on a
worker with one GPU) runs Celery's threads pool: each task thread parses its message and hands
the batch to this process's feeder, then blocks until the batch is stored; the task returns,
and Celery acknowledges the message (late acks: only ever after the commit). Inside, two stages
joined by a bounded queue overlap:

1. the *collector* takes every batch waiting (up to ``EMBEDQ_COALESCE_TEXTS`` texts; when the
   first is alone it waits ``EMBEDQ_COALESCE_WAIT_MS`` for company, so concurrent one-text
   jobs share a call, as TEI and Infinity batch concurrent requests), claims them in one
   transaction and runs the engine once on all their texts (tokenising is part of the call);
2. the *writer* stores the group in one transaction (``tasks.batches.store_encoded`` per batch:
   each batch still ends on its own, with its own statistics) and wakes the task threads.

While the writer commits group k, the collector claims and runs group k+1; the queue between
them holds one group, so at most three groups are in the process (collecting, running, writing)
and the threads pool bounds the batches.

Anything off the common path is handed back to its task thread, which runs the batch alone with
``tasks.batches.run_message`` (as a prefork worker would): a message for a model this host
lacks, a batch the claim does not give (ended, or an application's raw message), a message that
does not fit its job or its ledger record (``BatchMessage.misfit``), an engine call that raises
(texts the model refuses, bad input), a write that fails for good (one the job has no room for
among them). A write the store refuses for a while (a full disk, a lock) is tried again in place
with the vectors kept (``tasks.writing``); when it still fails, each task thread raises its
error for the task's retry policy. So every way out stays a recorded outcome, and a batch is
never stored twice: the ledger's claim and end decide, as for any redelivery.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import numpy as np

from storage import batch_results, ledger
from storage.models import BatchState
from storage.session import scope
from tasks import batches, failures, outcomes, writing
from tasks.message import BatchMessage
from tasks.outcomes import Outcome
from tasks.runtime import Runtime
from worker import lifecycle, metrics
from worker.engine import Encoding

logger = logging.getLogger(__name__)

RUN_ALONE = None
"""What a batch's future resolves to when its task thread should run it alone."""

Ran = Outcome | Exception | None
"""How the feeder ran a batch: its outcome, the error to raise in its task thread, or
``RUN_ALONE``."""


@dataclass
class _Batch:
    message: BatchMessage
    received: float
    done: Future[Outcome | None] = field(default_factory=Future)


def _ran(done: Future[Outcome | None]) -> Ran:
    error = done.exception()
    if error is None:
        return done.result()
    if isinstance(error, Exception):
        return error
    raise error


@dataclass
class _Group:
    """Batches of one model that ran as one engine call, waiting for the writer."""

    batches: list[_Batch]
    encodings: list[Encoding]
    provider: str
    model_sha256: str | None


class Feeder:
    """This process's feeder (see the module): ``run`` from any number of task threads."""

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.max_texts = settings.coalesce_texts
        self.wait_s = settings.coalesce_wait_ms / 1000
        self._inbox: queue.SimpleQueue[_Batch] = queue.SimpleQueue()
        self._writes: queue.Queue[_Group] = queue.Queue(maxsize=1)
        self.calls = 0
        """Engine calls made (a test reads how many batches shared one)."""
        for name, loop in (("collector", self._collect), ("writer", self._write)):
            threading.Thread(target=loop, name=f"embedq-feeder-{name}", daemon=True).start()

    def run(self, messages: list[BatchMessage]) -> list[Ran]:
        """Run the messages' batches with the others waiting; each one's outcome once stored,
        the transient error its write still met after its tries in place (for the task's
        retry policy), or ``RUN_ALONE`` when the caller must run it by itself."""
        now = time.time()
        taken = [_Batch(message, now) for message in messages]
        for batch in taken:
            self._inbox.put(batch)
        return [_ran(batch.done) for batch in taken]

    # --- stage 1: collect, claim, run ------------------------------------------------------

    def _collect(self) -> None:
        while True:
            group = self._take()
            try:
                self._run_group(group)
            except Exception:  # never lose a batch to a bug here: each runs alone instead
                logger.exception("the feeder could not run %d batches together", len(group))
                _hand_back(group)

    def _take(self) -> list[_Batch]:
        """The batches waiting, up to ``max_texts`` texts: the first blocks, the rest do not;
        a first batch that is alone waits ``wait_s`` for company."""
        group = [self._inbox.get()]
        texts = len(group[0].message.texts)
        deadline = time.monotonic() + self.wait_s
        while texts < self.max_texts:
            try:
                left = deadline - time.monotonic()
                batch = self._inbox.get(timeout=left) if left > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
            group.append(batch)
            texts += len(batch.message.texts)
        return group

    def _run_group(self, group: list[_Batch]) -> None:
        by_model: dict[str, list[_Batch]] = {}
        for batch in group:
            by_model.setdefault(batch.message.model, []).append(batch)
        for model, same in by_model.items():
            try:
                engine = self.runtime.engines(model)
            except Exception:  # missing, being prepared, broken: the task thread's path says
                _hand_back(same)
                continue
            claimed = self._claim(same)
            if not claimed:
                continue
            texts = [text for batch in claimed for text in batch.message.texts]
            try:
                encoding = engine.encode(texts)
            except Exception:  # refused texts, bad input: each batch alone finds which
                _hand_back(claimed)
                continue
            self.calls += 1
            metrics.observe_encoded(model, len(texts))
            parts = split(encoding, [len(batch.message.texts) for batch in claimed])
            self._writes.put(_Group(claimed, parts, engine.provider, engine.model_sha256))

    def _claim(self, group: list[_Batch]) -> list[_Batch]:
        """Claim the batches in one transaction (two statements); those the claim does not
        give (ended, unknown to the ledger, a second copy of one in the group) or whose
        message does not fit what it read (``BatchMessage.misfit``) go back to their threads."""
        keys = [(batch.message.job_id, batch.message.batch_index) for batch in group]
        with scope(self.runtime.sessions) as session:
            taken, facts = ledger.claim_many(session, sorted(set(keys)), self.runtime.worker)
        claimed: list[_Batch] = []
        back: list[_Batch] = []
        for batch, key in zip(group, keys, strict=True):
            recorded = taken.pop(key, None)  # a second copy of the batch in this group goes back
            claim = ledger.Claim(BatchState.SENT, True, recorded, facts.get(key[0]))
            fits = recorded is not None and claim.job is not None
            (claimed if fits and batch.message.misfit(claim) is None else back).append(batch)
        _hand_back(back)
        return claimed

    # --- stage 2: write ---------------------------------------------------------------------

    def _write(self) -> None:
        host = lifecycle.machine_host(self.runtime.settings)
        while True:
            group = self._writes.get()
            try:
                ended = self._store(group, host)
            except Exception as exc:  # nothing of the group was committed
                if failures.is_transient(exc):  # tried in place already: the tasks' retries
                    for batch in group.batches:
                        batch.done.set_exception(exc)
                    continue
                logger.warning(  # one batch the job has no room for, say: each runs alone
                    "the feeder could not store %d batches together; each runs alone",
                    len(group.batches),
                    exc_info=True,
                )
                _hand_back(group.batches)
                continue
            for batch, outcome in zip(group.batches, ended, strict=True):
                batch.done.set_result(outcome)

    def _store(self, group: _Group, host: str) -> list[Outcome]:
        """Store the group in one transaction, tried again in place while the store refuses it
        for a reason that may pass (``tasks.writing``), and say how each batch ended."""
        finished = [
            outcomes.finished_batch(
                batch.message,
                encoding,
                {},
                group.provider,
                batch.received,
                group.model_sha256,
                host,
            )
            for batch, encoding in zip(group.batches, group.encodings, strict=True)
        ]
        stored = writing.keep_writing(
            self.runtime.sessions,
            lambda session: batch_results.store_group(session, finished),
            self.runtime.settings,
            started=min(batch.received for batch in group.batches),
            batches=[(batch.message.job_id, batch.message.batch_index) for batch in group.batches],
        )
        return [
            outcomes.stored_outcome(batch.message, done, result, group.provider)
            for batch, done, result in zip(group.batches, finished, stored, strict=True)
        ]


def _hand_back(group: list[_Batch]) -> None:
    for batch in group:
        batch.done.set_result(RUN_ALONE)


def split(encoding: Encoding, sizes: list[int]) -> list[Encoding]:
    """One engine call's encoding cut into the batches it ran for, in order. Each part has its
    own vectors, token counts and truncation; the call's time and padding are shared among the
    parts in proportion to their texts."""
    parts, start = [], 0
    stats = encoding.stats
    for size in sizes:
        end = start + size
        counts = encoding.token_counts[start:end]
        share = size / stats.texts
        part_stats = replace(
            stats,
            texts=size,
            tokens=sum(counts),
            padded_tokens=round(stats.padded_tokens * share),
            truncated=sum(encoding.truncated[start:end]),
            micro_batches=max(1, round(stats.micro_batches * share)),
            tokenize_ms=stats.tokenize_ms * share,
            inference_ms=stats.inference_ms * share,
            pool_ms=stats.pool_ms * share,
        )
        parts.append(
            Encoding(
                np.ascontiguousarray(encoding.vectors[start:end]),
                part_stats,
                token_counts=counts,
                truncated=encoding.truncated[start:end],
            )
        )
        start = end
    return parts


_feeders: dict[int, Feeder] = {}
_lock = threading.Lock()


def run_message(raw: object, runtime: Runtime) -> Outcome:
    """``tasks.batches.run_message`` through this process's feeder: a message that parses runs
    with the others waiting, anything else (and whatever the feeder hands back) alone."""
    return outcome_of(raw, run_messages([raw], runtime)[0], runtime)


def outcome_of(raw: object, ran: Ran, runtime: Runtime) -> Outcome:
    """How a message the feeder was handed ended: its outcome; the error its write met,
    raised; or, when the feeder handed it back, ``tasks.batches.run_message``'s."""
    if isinstance(ran, Exception):
        raise ran
    return batches.run_message(raw, runtime) if ran is RUN_ALONE else ran


def run_messages(raws: list[object], runtime: Runtime) -> list[Ran]:
    """Several messages through this process's feeder at once: each one's outcome, its
    write's error, or ``RUN_ALONE`` for one that does not parse or that the feeder hands back."""
    parsed: dict[int, BatchMessage] = {}
    for i, raw in enumerate(raws):
        try:
            parsed[i] = BatchMessage.model_validate(raw)
        except Exception:  # run alone, where its failure is recorded with its reason
            continue
    ran = feeder_for(runtime).run(list(parsed.values())) if parsed else []
    outcomes: list[Ran] = [RUN_ALONE] * len(raws)
    for i, outcome in zip(parsed, ran, strict=True):
        outcomes[i] = outcome
    return outcomes


def feeder_for(runtime: Runtime) -> Feeder:
    """This process's feeder for ``runtime``'s settings, started on first use."""
    key = id(runtime.settings)
    with _lock:
        if key not in _feeders:
            _feeders[key] = Feeder(runtime)
        return _feeders[key]
