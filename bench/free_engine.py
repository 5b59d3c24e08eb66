"""An engine that costs nothing, for measuring the pipeline around it (``bench/ceiling.py``).

It keeps the engine's contract where the pipeline can see it: unit float32 vectors of the
model's dimension in input order, and each text's real token count (read from a table the
benchmark made with the real tokenizer beforehand, so tokenising is measured once, on its own,
and not again inside every batch). The vectors are precomputed unit vectors handed out in turn:
what they hold is not the point, their bytes are.

A worker runs with it when started as ``celery -A bench.free_engine worker ...`` with
``EMBEDQ_BENCH_TOKENS`` naming the table (a JSON object text -> token count): this module puts
the engine in place of ``worker.lifecycle.get_engine`` and then is the worker's app module.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import numpy as np

from worker import lifecycle
from worker.app import app
from worker.engine import EncodeStats, Encoding, Progress

__all__ = ["FreeEngine", "app"]

TOKENS_ENV = "EMBEDQ_BENCH_TOKENS"
POOL = 4096  # distinct precomputed vectors


class FreeEngine:
    """Precomputed unit vectors, real token counts."""

    provider = "FreeEngine"
    precision = "fp32"
    model_sha256 = "f" * 64
    max_tokens = 256
    micro_batch = 1024

    def __init__(self, tokens: dict[str, int] | None = None, dim: int = 384) -> None:
        self._tokens = tokens or {}
        rng = np.random.default_rng(0)
        pool = rng.standard_normal((POOL, dim)).astype(np.float32)
        self._pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)
        self._next = 0
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: Sequence[object], on_progress: Progress | None = None) -> Encoding:
        started = time.perf_counter()
        count = len(texts)
        rows = (np.arange(self._next, self._next + count) % POOL).astype(np.intp)
        self._next = (self._next + count) % POOL
        vectors = self._pool[rows]
        known = self._tokens
        tokens = tuple(
            min(known.get(text, 0) or len(str(text).split()) + 2, self.max_tokens) for text in texts
        )
        truncated = tuple(n >= self.max_tokens for n in tokens)
        if on_progress is not None:
            on_progress(count, count)
        ms = (time.perf_counter() - started) * 1000
        stats = EncodeStats(
            texts=count,
            tokens=sum(tokens),
            padded_tokens=max(tokens, default=0) * count,
            truncated=sum(truncated),
            micro_batches=1,
            tokenize_ms=0.0,
            inference_ms=ms,
            pool_ms=0.0,
            provider=self.provider,
            precision=self.precision,
        )
        return Encoding(vectors, stats, token_counts=tokens, truncated=truncated)


def load_tokens(path: str | None) -> dict[str, int]:
    if not path:
        return {}
    with open(path, encoding="utf-8") as file:
        table: dict[str, int] = json.load(file)
    return table


_engine: FreeEngine | None = None


def _free_engine(model: str, settings: object = None) -> FreeEngine:
    global _engine
    if _engine is None:
        _engine = FreeEngine(load_tokens(os.environ.get(TOKENS_ENV)))
    return _engine


if os.environ.get(TOKENS_ENV) is not None:  # imported as a worker's app module
    lifecycle.get_engine = _free_engine  # type: ignore[assignment]
