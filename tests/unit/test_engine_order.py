"""Engine.encode runs texts in length-sorted micro-batches and must put every vector back at its
text's place in the input, whatever the lengths and the micro-batch limits: checked here on a
stand-in ONNX session and tokenizer, on the real model in tests/integration/test_engine_order.py."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from worker.engine import Engine
from worker.manifest import Behaviour, Manifest, Pooling, Precision
from worker.settings import Settings

WORDS = [f"w{i}" for i in range(30)]
VOCAB = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
MAX_LENGTH = 64
DIM = len(VOCAB) + 1


class PositionalSession:
    """An ONNX session stand-in: token ``j`` with id ``t`` is one-hot at ``t`` scaled by
    ``j + 1``, plus ``j`` in the last column, so the mean-pooled vector of a text depends on its
    tokens, their order and its length. It records the shape of every micro-batch it runs."""

    provider = "FakeProvider"
    precision = Precision.FP32

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        ids = feeds["input_ids"]
        rows, width = ids.shape
        self.shapes.append((rows, width))
        tokens = np.zeros((rows, width, DIM), dtype=np.float32)
        place = np.arange(width, dtype=np.float32)
        for row in range(rows):
            tokens[row, np.arange(width), ids[row]] = place + 1
            tokens[row, :, -1] = place
        return tokens


def word_tokenizer() -> Tokenizer:
    """A word-level tokenizer built in memory (no hub, no file), truncating as the engine's."""
    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    return tokenizer


def fake_engine(micro_batch_size: int, micro_batch_tokens: int) -> tuple[Engine, PositionalSession]:
    manifest = Manifest(
        name="order",
        source="memory",
        onnx_sha256="0" * 64,
        dim=DIM,
        behaviour=Behaviour(max_seq_length=MAX_LENGTH, pooling=Pooling.MEAN, normalize=False),
        inputs=("input_ids", "attention_mask"),
        output="last_hidden_state",
        created_at=datetime.now(UTC),
        created_by="copied",
    )
    session = PositionalSession()
    config = Settings(
        max_batch_items=1024,
        micro_batch_size=micro_batch_size,
        micro_batch_tokens=micro_batch_tokens,
    )
    return Engine(manifest, session, word_tokenizer(), config), session


# Texts of 1 to 90 words (some over the 64-token limit), unknown words included.
text = st.lists(st.sampled_from([*WORDS, "unknown", "zz"]), min_size=1, max_size=90).map(" ".join)


@st.composite
def batches(draw: st.DrawFn) -> list[str]:
    """1 to 60 texts drawn from a pool, so that the same text often comes more than once."""
    pool = draw(st.lists(text, min_size=1, max_size=60))
    return draw(st.lists(st.sampled_from(pool), min_size=1, max_size=60))


@settings(max_examples=60, deadline=None)
@given(
    texts=batches(),
    micro_batch_size=st.integers(1, 20),
    micro_batch_tokens=st.integers(8, 512),
)
def test_vectors_come_back_in_input_order_whatever_the_lengths_and_limits(
    texts: list[str], micro_batch_size: int, micro_batch_tokens: int
) -> None:
    engine, session = fake_engine(micro_batch_size, micro_batch_tokens)
    result = engine.encode(texts)
    assert all(rows <= micro_batch_size for rows, _ in session.shapes)
    assert all(rows * width <= micro_batch_tokens or rows == 1 for rows, width in session.shapes)
    assert result.vectors.shape == (len(texts), DIM)
    alone = np.concatenate([engine.encode([t]).vectors for t in texts])
    np.testing.assert_allclose(result.vectors, alone, rtol=1e-6, atol=0)
    words = [min(len(t.split()), MAX_LENGTH) for t in texts]
    assert list(result.token_counts) == words
    assert list(result.truncated) == [len(t.split()) > MAX_LENGTH for t in texts]


def test_the_fake_session_tells_texts_apart() -> None:
    """The property above is only as good as the vectors are distinct: the order of the words
    and the length of a text both show in its vector."""
    engine, _ = fake_engine(4, 64)
    vectors = engine.encode(["w1 w2", "w2 w1", "w1 w2 w2", "w1"]).vectors
    assert len({row.tobytes() for row in vectors}) == 4
