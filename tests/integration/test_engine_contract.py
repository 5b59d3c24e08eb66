"""One contract for the fake engine the unit tests use and the real one: if the fake drifts
from what the real engine does, the unit tests built on it stop meaning anything (the
stub-and-real-broker pattern of dramatiq's tests)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fakes import FakeEngine
from worker.engine import NOTHING_READ, Embedder, Engine
from worker.errors import InputError, TextsRefusedError

TEXTS = [
    "The cat sat on the mat.",
    "A fast brown fox jumps over the lazy dog near the river bank.",
    "x",
    "Embeddings map texts to vectors.",
    "word " * 400,  # longer than the model's 256 tokens
]


@pytest.fixture(params=["fake", "real"])
def embedder(request: pytest.FixtureRequest) -> Embedder:
    if request.param == "fake":
        return FakeEngine(dim=384)
    engine: Engine = request.getfixturevalue("engine")
    return engine


def test_it_names_its_provider_and_model_file(embedder: Embedder) -> None:
    assert isinstance(embedder.provider, str) and embedder.provider
    sha = embedder.model_sha256
    assert sha is not None and len(sha) == 64 and int(sha, 16) >= 0


def test_unit_float32_vectors_one_per_text(embedder: Embedder) -> None:
    vectors = embedder.encode(TEXTS).vectors
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(TEXTS), embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_a_text_gets_its_own_vector_whatever_its_neighbours(embedder: Embedder) -> None:
    together = embedder.encode(TEXTS).vectors
    for i, text in enumerate(TEXTS):
        alone = embedder.encode([text]).vectors[0]
        assert float(together[i] @ alone) > 0.9999
    different = together @ together.T
    assert float(np.max(different - np.eye(len(TEXTS)) * 2)) < 0.99  # distinct texts differ


def test_token_counts_truncation_and_statistics_add_up(embedder: Embedder) -> None:
    result = embedder.encode(TEXTS)
    stats = result.stats
    assert len(result.token_counts) == len(result.truncated) == stats.texts == len(TEXTS)
    assert stats.tokens == sum(result.token_counts)
    assert stats.tokens <= stats.padded_tokens <= max(result.token_counts) * len(TEXTS)
    assert result.truncated == (False, False, False, False, True)
    assert stats.truncated == 1
    assert result.token_counts[-1] == 256 and max(result.token_counts[:-1]) < 256
    assert result.token_counts[2] < result.token_counts[1]
    assert stats.micro_batches >= 1
    assert stats.total_ms > 0
    assert stats.provider and stats.precision in {"fp32", "fp16", "int8", "bf16"}


def test_progress_after_each_micro_batch_ends_at_the_total(embedder: Embedder) -> None:
    seen: list[tuple[int, int]] = []
    texts = [f"text number {i} about something" for i in range(40)]
    embedder.encode(texts, lambda done, total: seen.append((done, total)))
    assert seen[-1] == (40, 40)
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(set(done)) == len(done)
    assert {n for _, n in seen} == {40}


@pytest.mark.parametrize(
    "bad", [[], ["fine", "   "], ["fine", 7], ["fine", None], ["x"] * 1025], ids=repr
)
def test_unusable_batches_are_refused_whole(embedder: Embedder, bad: list[object]) -> None:
    with pytest.raises(InputError):
        embedder.encode(bad)


def test_texts_the_model_reads_nothing_in_are_refused_by_index(embedder: Embedder) -> None:
    texts = ["a good text", "\u200b\u200b", "another good one", "\u200b \u200d"]
    with pytest.raises(TextsRefusedError) as caught:
        embedder.encode(texts)
    assert caught.value.indices == (1, 3)
    assert caught.value.reason == NOTHING_READ
    assert str(caught.value).startswith("texts at index 1, 3: ")
    assert embedder.encode([t for i, t in enumerate(texts) if i not in (1, 3)]).stats.texts == 2
