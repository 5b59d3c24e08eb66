"""A deterministic fake engine for tests that need the task logic, not the model."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from worker.engine import EncodeStats, Encoding
from worker.validation import validate


class FakeEngine:
    """Vectors from a hash of each text: equal texts give equal unit vectors."""

    provider = "FakeProvider"

    def __init__(self, dim: int = 8) -> None:
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: Sequence[object], on_progress: object = None) -> Encoding:
        clean = validate(texts, 1024)
        rows = []
        for text in clean:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            row = np.random.default_rng(seed).standard_normal(self._dim).astype(np.float32)
            rows.append(row / np.linalg.norm(row))
        tokens = tuple(len(t.split()) + 2 for t in clean)
        stats = EncodeStats(
            len(clean), sum(tokens), max(tokens) * len(clean), 0, 1, 0.1, 0.2, 0.1, self.provider
        )
        return Encoding(
            np.stack(rows), stats, token_counts=tokens, truncated=tuple(False for _ in clean)
        )
