"""A short measured probe: the rate a dry run assumes when the fleet has no recorded one for the
model (no job of it has run ``estimate.RATE_TEXTS`` texts yet).

Some of the texts the run would embed (a sample drawn evenly from all of them) go through the
model here, loaded from this machine's model store as a worker loads it, after a warm-up; the
tokens per second it ran at stand for one worker process of this machine, which the estimate
says.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

from tasks.backfill.chunks import WINDOW
from worker import extra
from worker.errors import EmbedqError
from worker.settings import Settings

PROBE_TEXTS = 256
"""Texts a probe runs (after a warm-up of a few)."""


class Sample:
    """``PROBE_TEXTS`` texts drawn evenly from all those offered (reservoir sampling, seeded):
    the first ones alone are not the run's mix, as a run cuts its batches by length."""

    def __init__(self, size: int = PROBE_TEXTS, seed: int = 0) -> None:
        self.size = size
        self.texts: list[str] = []
        self.seen = 0
        self._random = random.Random(seed)

    def offer(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.seen += 1
            if len(self.texts) < self.size:
                self.texts.append(text)
            elif (slot := self._random.randrange(self.seen)) < self.size:
                self.texts[slot] = text


def probe_rate(settings: Settings, model: str, texts: list[str]) -> tuple[float | None, str]:
    """Tokens per second this machine runs ``model`` at on ``texts`` (up to ``PROBE_TEXTS``),
    and what that figure is; ``None`` and why no probe can run here."""
    if not texts:
        return None, "nothing to embed"
    if (absent := extra.missing(*extra.RUNTIME)) is not None:
        return None, f"{absent} is not installed"
    from worker.engine import Engine
    from worker.model_store import ModelStore

    try:
        store = ModelStore(settings.model_dir)
        store.get(model)
        engine = Engine.load(store.path(model), settings)
    except (OSError, EmbedqError) as error:
        return None, str(error)
    # Sorted by length and cut in WINDOW batches: each covers the share of the lengths a run's
    # batch covers of its window (tasks.backfill.chunks), so it pads as much as the run's do.
    sample = sorted(texts[:PROBE_TEXTS], key=len)
    engine.encode(sample[:8])  # warm-up: the first run of each shape costs more
    step = max(1, -(-len(sample) // WINDOW))
    tokens, started = 0, time.perf_counter()
    for start in range(0, len(sample), step):
        tokens += engine.encode(sample[start : start + step]).stats.tokens
    spent = time.perf_counter() - started
    rate = tokens / spent
    return rate, (
        f"a probe on this machine: {len(sample)} of the texts, {tokens:,} tokens in {spent:.1f} s"
        f" ({rate:,.0f} tokens/s, one process on {engine.provider}); no job of {model!r} has run"
        " enough texts to know the fleet's rate"
    )
