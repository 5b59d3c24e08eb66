"""Fakes for tests that need the task logic, not the model or the broker: a deterministic fake
engine, and publishers that keep or run what they are given.

The fake engine keeps the real engine's contract (``tests/integration/test_engine_contract.py``
runs the same checks on both): unit float32 vectors in input order, the same vector for the same
text whatever its neighbours, the validation errors (and the texts it reads nothing in),
per-text token counts and truncation at ``max_tokens``, progress after each micro-batch, and
statistics that add up.
"""

from __future__ import annotations

import hashlib
import threading
import unicodedata
from collections.abc import Sequence

import numpy as np

from storage.session import sessions_for
from tasks.batches import run_message
from tasks.message import BatchMessage
from tasks.outcomes import Outcome
from tasks.runtime import Runtime
from worker.engine import NOTHING_READ, EncodeStats, Encoding, Progress
from worker.errors import TextsRefusedError
from worker.settings import Settings
from worker.validation import validate


class FakeEngine:
    """Vectors from a hash of each text: equal texts give equal unit vectors. A text "has" a
    token per word plus two special tokens, cut at ``max_tokens``; a text of nothing but
    characters a BERT tokenizer removes (control, format, whitespace, combining marks) has no
    token of its own, and is refused as the real engine refuses it."""

    provider = "FakeProvider"
    precision = "fp32"
    model_sha256 = hashlib.sha256(b"FakeEngine").hexdigest()
    """Stands for the model file's hash, which the worker records with each job."""

    def __init__(self, dim: int = 8, max_tokens: int = 256, micro_batch: int = 16) -> None:
        self._dim = dim
        self.max_tokens = max_tokens
        self.micro_batch = micro_batch

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: Sequence[object], on_progress: Progress | None = None) -> Encoding:
        clean = validate(texts, 1024)
        unread = tuple(i for i, text in enumerate(clean) if not _read(text))
        if unread:
            raise TextsRefusedError(unread, NOTHING_READ)
        rows = []
        for done, text in enumerate(clean, start=1):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            row = np.random.default_rng(seed).standard_normal(self._dim).astype(np.float32)
            rows.append(row / np.linalg.norm(row))
            if on_progress is not None and (done % self.micro_batch == 0 or done == len(clean)):
                on_progress(done, len(clean))
        wanted = [len(t.split()) + 2 for t in clean]
        tokens = tuple(min(n, self.max_tokens) for n in wanted)
        truncated = tuple(n > self.max_tokens for n in wanted)
        stats = EncodeStats(
            texts=len(clean),
            tokens=sum(tokens),
            padded_tokens=max(tokens) * len(clean),
            truncated=sum(truncated),
            micro_batches=-(-len(clean) // self.micro_batch),
            tokenize_ms=0.1,
            inference_ms=0.2,
            pool_ms=0.1,
            provider=self.provider,
            precision=self.precision,
        )
        return Encoding(np.stack(rows), stats, token_counts=tokens, truncated=truncated)


def _read(text: str) -> bool:
    """Whether a BERT tokenizer keeps any character of ``text``."""
    return any(
        unicodedata.category(c)[0] not in "CZ" and unicodedata.category(c) != "Mn" for c in text
    )


class RecordingPublisher:
    """A broker that keeps what it is given: the messages, and the queue of each."""

    def __init__(self) -> None:
        self.sent: list[BatchMessage] = []
        self.queues: list[str] = []

    def publish(self, messages: Sequence[BatchMessage], queue: str) -> None:
        self.sent.extend(messages)
        self.queues.extend(str(queue) for _ in messages)


def fake_runtime(settings: Settings, engine: FakeEngine | None = None) -> Runtime:
    """A worker's runtime on the store ``settings`` name, with the fake engine for every
    model (``Runtime.engines``)."""
    model = engine or FakeEngine()
    return Runtime(
        settings,
        sessions_for(settings.database_url),
        lambda name: model,
        worker="test-host:1",
        local=True,
    )


class InlinePublisher:
    """The broker and a worker in one: each batch runs as it is published, with the worker's
    own code (``tasks.batches.run_message``) and the fake engine."""

    def __init__(self, settings: Settings, engine: FakeEngine | None = None) -> None:
        self.runtime = fake_runtime(settings, engine)
        self.outcomes: list[Outcome] = []

    def publish(self, messages: Sequence[BatchMessage], queue: str) -> None:
        for message in messages:
            self.outcomes.append(run_message(message.body(), self.runtime))


def run_in_task_threads(runtime: object, messages: list[BatchMessage]) -> list[Outcome | Exception]:
    """Each message through the feeder from its own thread, all at once, as the threads pool's
    task threads hand them over: each one's outcome, or the error its task would be handed."""
    from tasks import feeder

    ended: list[Outcome | Exception | None] = [None] * len(messages)
    start = threading.Barrier(len(messages))

    def one(i: int) -> None:
        start.wait()
        try:
            ended[i] = feeder.run_message(messages[i].body(), runtime)  # type: ignore[arg-type]
        except Exception as exc:  # what the task's retry policy would be handed
            ended[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(messages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(result is not None for result in ended), "a task thread did not end in 30 s"
    return [result for result in ended if result is not None]
