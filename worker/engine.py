"""The inference engine: one warm runtime session and one tokenizer, built once per process.

``Engine.load`` reads a prepared model folder (its manifest settles length, pooling and
normalisation), checks the ONNX file against the manifest's sha256, and opens a session on the
runtime ``worker.runtimes`` picks (ONNX Runtime, or OpenVINO for bf16), which reports the
provider and precision it really got. ``Engine.encode`` validates
a list of texts, tokenises with truncation at the model's length, runs length-sorted
micro-batches, pools, normalises and returns the vectors in input order with the statistics of
the call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Encoding as TokenEncoding
from tokenizers import Tokenizer

from worker import batching, pooling, runtimes
from worker.errors import ModelError, TextsRefusedError
from worker.manifest import TOKENIZER_FILE, Manifest, verify
from worker.settings import Settings
from worker.validation import validate

logger = logging.getLogger(__name__)

# Texts are cut to this many characters per allowed token before tokenising (TEI does the
# same): no real token is that long, so the result is unchanged, and a 10 MB text costs no more
# to tokenise than a few pages.
CHARS_PER_TOKEN = 250
KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
NOTHING_READ = (
    "the model reads nothing in this text: its tokenizer keeps none of its characters (only"
    " characters it removes, such as zero-width or control characters)"
)
"""Why a text is refused whose tokens are all the tokenizer's own (``[CLS] [SEP]``): like an
empty text, it has nothing to embed."""
Feeds = runtimes.Feeds


@dataclass(frozen=True)
class EncodeStats:
    """What one ``encode`` call did and how long each stage took."""

    texts: int
    tokens: int
    padded_tokens: int
    truncated: int
    micro_batches: int
    tokenize_ms: float
    inference_ms: float
    pool_ms: float
    provider: str
    precision: str = "fp32"
    """The arithmetic that really ran (a bf16 model on a CPU without bf16 runs fp32)."""

    @property
    def total_ms(self) -> float:
        return self.tokenize_ms + self.inference_ms + self.pool_ms


@dataclass(frozen=True)
class Encoding:
    """The vectors of one call, float32 ``(texts, dim)`` in input order, and its statistics."""

    vectors: np.ndarray
    stats: EncodeStats
    token_counts: tuple[int, ...] = ()
    """Tokens each text ran with, in input order (after truncation)."""
    truncated: tuple[bool, ...] = ()
    """Whether each text was cut to the model's length, in input order."""


Progress = Callable[[int, int], None]
"""Called after each micro-batch with (texts done, texts in the call)."""


class Embedder(Protocol):
    """What a task needs of an engine; tests pass a deterministic fake, held to the same
    contract (``tests/integration/test_engine_contract.py``)."""

    provider: str
    """The execution provider that really runs the model (``CPUExecutionProvider``...)."""

    @property
    def dim(self) -> int: ...

    @property
    def model_sha256(self) -> str | None:
        """The sha256 of the model file that makes the vectors, recorded with each job."""
        ...

    def encode(self, texts: Sequence[object], on_progress: Progress | None = None) -> Encoding: ...


def load_tokenizer(path: Path, max_length: int) -> Tokenizer:
    """The model's tokenizer, truncating at the model's length and padding nothing (the engine
    pads each micro-batch to its own longest text)."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise ModelError(f"cannot read tokenizer {path}: {exc}") from exc
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def pad(batch: Sequence[TokenEncoding], inputs: Sequence[str]) -> tuple[Feeds, np.ndarray]:
    """Session feeds for ``batch``, right-padded to its longest text, and the attention mask."""
    width = max(len(enc.ids) for enc in batch)
    ids = np.zeros((len(batch), width), dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    types = np.zeros((len(batch), width), dtype=np.int64)
    for row, enc in enumerate(batch):
        n = len(enc.ids)
        ids[row, :n] = enc.ids
        mask[row, :n] = 1
        types[row, :n] = enc.type_ids
    available = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: available[name] for name in inputs}, mask


class Engine:
    """A prepared model, warm: one session and one tokenizer, reused for every call."""

    def __init__(
        self,
        manifest: Manifest,
        session: runtimes.Session,
        tokenizer: Tokenizer,
        settings: Settings,
    ) -> None:
        unknown = set(manifest.inputs) - set(KNOWN_INPUTS)
        if unknown:
            raise ModelError(f"model {manifest.name} takes inputs embedq cannot feed: {unknown}")
        self.manifest = manifest
        self.provider = session.provider
        self.precision = session.precision
        self._session = session
        self._tokenizer = tokenizer
        self._max_items = settings.max_batch_items
        self._micro_items = settings.micro_batch_size
        self._micro_tokens = settings.micro_batch_tokens

    @property
    def model_sha256(self) -> str:
        return self.manifest.onnx_sha256

    @classmethod
    def load(cls, folder: Path, settings: Settings, device_id: int | None = None) -> Engine:
        """Build the engine for the model prepared in ``folder`` (on GPU ``device_id``); a model
        file that does not match its manifest raises ``ModelCorruptError``."""
        started = time.perf_counter()
        manifest = Manifest.read(folder)
        verify(folder, manifest)
        verify_ms = (time.perf_counter() - started) * 1000
        tokenizer = load_tokenizer(folder / TOKENIZER_FILE, manifest.behaviour.max_seq_length)
        session = runtimes.open_session(folder, manifest, settings, device_id)
        load_ms = (time.perf_counter() - started) * 1000
        logger.info(
            "engine loaded: model=%s provider=%s device=%s precision=%s threads=%d load_ms=%.0f"
            " verify_ms=%.0f",
            manifest.name,
            session.provider,
            "-" if device_id is None else device_id,
            session.precision,
            settings.threads(),
            load_ms,
            verify_ms,
            extra={
                "model": manifest.name,
                "provider": session.provider,
                "precision": str(session.precision),
                "device": device_id,
                "load_ms": load_ms,
                "verify_ms": verify_ms,
            },
        )
        return cls(manifest, session, tokenizer, settings)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def encode(self, texts: Sequence[object], on_progress: Progress | None = None) -> Encoding:
        """Vectors for ``texts`` in input order; raises ``InputError`` before any work if the
        batch is unusable, ``TextsRefusedError`` naming the texts the model reads nothing in."""
        t0 = time.perf_counter()
        clean = validate(texts, self._max_items)
        behaviour = self.manifest.behaviour
        limit = behaviour.max_seq_length * CHARS_PER_TOKEN
        encodings = self._tokenizer.encode_batch([t[:limit] for t in clean])
        cut = tuple(
            bool(enc.overflowing) or len(text) > limit
            for text, enc in zip(clean, encodings, strict=True)
        )
        unread = tuple(i for i, enc in enumerate(encodings) if all(enc.special_tokens_mask))
        if unread:
            raise TextsRefusedError(unread, NOTHING_READ)
        lengths = [len(enc.ids) for enc in encodings]
        plan = batching.plan(lengths, max_items=self._micro_items, max_tokens=self._micro_tokens)
        t1 = time.perf_counter()

        vectors = np.empty((len(clean), self.dim), dtype=np.float32)
        padded = 0
        run_s = 0.0
        done = 0
        for indices in plan:
            feeds, mask = pad([encodings[i] for i in indices], self.manifest.inputs)
            padded += mask.size
            r0 = time.perf_counter()
            tokens = self._session.run(feeds)
            run_s += time.perf_counter() - r0
            pooled = pooling.pool(tokens, mask, behaviour.pooling)
            vectors[indices] = pooled
            done += len(indices)
            if on_progress is not None:
                on_progress(done, len(clean))
        if behaviour.normalize:
            vectors = pooling.l2_normalize(vectors)
        t2 = time.perf_counter()

        stats = EncodeStats(
            texts=len(clean),
            tokens=sum(lengths),
            padded_tokens=padded,
            truncated=sum(cut),
            micro_batches=len(plan),
            tokenize_ms=(t1 - t0) * 1000,
            inference_ms=run_s * 1000,
            pool_ms=((t2 - t1) - run_s) * 1000,
            provider=self.provider,
            precision=str(self.precision),
        )
        return Encoding(vectors, stats, token_counts=tuple(lengths), truncated=cut)
