"""Measuring how closely a candidate ONNX file reproduces a reference model.

Used twice when a model is prepared: an export is compared with the checkpoint run in torch, and
a quantised or half-precision file with the fp32 file it came from. The probe texts cover short,
mid-length and over-length inputs, so truncation and padding are part of what is compared.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from worker import engine, pooling
from worker.errors import ExportError
from worker.manifest import Behaviour

logger = logging.getLogger(__name__)

Reference = Callable[[dict[str, np.ndarray]], np.ndarray]

PROBE_TEXTS = (
    "A short sentence.",
    "The quick brown fox jumps over the lazy dog while the cat watches from the window.",
    "Embeddings map text to vectors; similar meanings land close together. " * 40,
    "ONNX Runtime runs the exported graph.",
    "How do I reverse a list in Python without copying it?",
    "Returns a new dictionary initialized from an optional positional argument.",
    "The weather in Lisbon was mild, with a light breeze coming off the river all afternoon.",
    "Error: connection refused while contacting the broker at 127.0.0.1:6379",
    "def add(a, b):\n    return a + b",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Batch jobs that never finish leave users guessing; progress and clear errors fix that.",
    "tokenizers splits text into word pieces; the model sees their ids.",
)


@dataclass(frozen=True)
class Parity:
    """How far a candidate's outputs are from the reference's on the probe texts."""

    max_abs_diff: float
    min_cosine: float
    mean_cosine: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _onnxruntime_cpu(path: Path) -> Reference:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda feeds: np.asarray(session.run(None, feeds)[0])


def measure(
    candidate: Path | Reference,
    reference: Reference,
    tokenizer: Tokenizer,
    inputs: Sequence[str],
    behaviour: Behaviour,
    texts: Sequence[str] = PROBE_TEXTS,
    *,
    label: str | None = None,
) -> Parity:
    """Run ``texts`` through ``candidate`` (an ONNX file, run by ONNX Runtime on the CPU, or a
    function of the feeds, such as an OpenVINO session) and ``reference`` and compare their raw
    outputs (max abs difference over real tokens) and the pooled vectors (cosine)."""
    if isinstance(candidate, Path):
        run, name = _onnxruntime_cpu(candidate), label or candidate.name
    else:
        run, name = candidate, label or "candidate"
    feeds, mask = engine.pad(tokenizer.encode_batch(list(texts)), inputs)
    got = np.asarray(run(feeds), dtype=np.float32)
    want = np.asarray(reference(feeds), dtype=np.float32)
    diff = np.abs(got - want)
    max_abs = float(diff[mask.astype(bool)].max() if diff.ndim == 3 else diff.max())
    a = pooling.l2_normalize(pooling.pool(got, mask, behaviour.pooling))
    b = pooling.l2_normalize(pooling.pool(want, mask, behaviour.pooling))
    similarity = (a * b).sum(axis=1)
    parity = Parity(max_abs, float(similarity.min()), float(similarity.mean()))
    logger.info(
        "parity measured: candidate=%s max_abs_diff=%.2e min_cosine=%.6f mean_cosine=%.6f",
        name,
        parity.max_abs_diff,
        parity.min_cosine,
        parity.mean_cosine,
        extra=parity.as_dict(),
    )
    return parity


def require(parity: Parity, what: str, *, min_cosine: float, max_abs: float | None = None) -> None:
    """Raise ``ExportError`` (nothing gets installed) when ``parity`` is outside the tolerance."""
    too_far = max_abs is not None and parity.max_abs_diff > max_abs
    if too_far or parity.min_cosine < min_cosine:
        limit = f" (limit {max_abs:.0e})" if max_abs is not None else ""
        raise ExportError(
            f"{what} differs too much from its reference: max abs diff"
            f" {parity.max_abs_diff:.2e}{limit}, min cosine {parity.min_cosine:.6f}"
            f" (limit {min_cosine}); refusing to install it"
        )
