"""Pooling and normalisation as pure numpy functions, matching sentence-transformers.

Every function takes the token embeddings ``(n, seq, dim)`` and the attention mask ``(n, seq)``
of one padded micro-batch and returns ``(n, dim)`` float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from worker.manifest import Pooling

Floats = npt.NDArray[np.float32]
Mask = npt.NDArray[np.int64]


def pool(tokens: Floats, mask: Mask, mode: Pooling) -> Floats:
    """One vector per row of ``tokens``, ignoring padded positions."""
    return np.asarray(_pool(tokens, mask, mode), dtype=np.float32)


def _pool(tokens: Floats, mask: Mask, mode: Pooling) -> Any:  # numpy ops are typed Any
    if mode is Pooling.NONE:
        return tokens
    if mode is Pooling.CLS:
        return tokens[:, 0]
    if mode is Pooling.LAST_TOKEN:
        # Right padding: the last real token sits at (number of real tokens - 1).
        last = np.maximum(mask.sum(axis=1) - 1, 0)
        return tokens[np.arange(tokens.shape[0]), last]
    weights = mask[:, :, None].astype(np.float32)
    if mode is Pooling.MAX:
        masked = np.where(weights > 0, tokens, np.float32(-1e9))
        return masked.max(axis=1)
    summed = np.einsum("nsd,ns->nd", tokens, weights[:, :, 0])
    counts = np.maximum(weights.sum(axis=1), np.float32(1e-9))
    if mode is Pooling.MEAN:
        return summed / counts
    return summed / np.sqrt(counts)  # MEAN_SQRT_LEN


def l2_normalize(vectors: Floats) -> Floats:
    """Rows scaled to unit length, as ``torch.nn.functional.normalize`` (eps 1e-12) does."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, np.float32(1e-12)), dtype=np.float32)
