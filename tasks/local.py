"""Local mode: no broker configured, so the batches of a job run in the submitting process as
they are published, with the same code a worker runs (``tasks.batches``). The producer's
default publisher in local mode (``tasks.publishing.publisher_for``); it loads the engine,
onnxruntime and tokenizers, which a producer that sends never does."""

from __future__ import annotations

from collections.abc import Sequence

from tasks import failures, names
from tasks.batches import fail_raw, run_message
from tasks.message import BatchMessage
from tasks.runtime import Runtime
from worker.settings import Settings


class LocalPublisher:
    """Local mode (no broker configured): each batch runs in this process as it is published,
    with the same code a worker runs; no retries, so a batch that raises ends failed with the
    reason."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        """Default: this process's, under ``settings``."""

    def publish(self, messages: Sequence[BatchMessage], queue: names.Queue | str) -> None:
        runtime = self.runtime or Runtime.of(self.settings, local=True)
        for message in messages:
            raw = message.body()
            try:
                run_message(raw, runtime)
            except Exception as exc:  # no retries in local mode: the batch ends with the reason
                fail_raw(runtime.sessions, raw, failures.describe(exc), failures.classify(exc))
