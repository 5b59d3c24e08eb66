"""The engine on the real exported all-MiniLM-L6-v2."""

import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cosines
from worker.engine import Engine
from worker.errors import InputError, ProviderError
from worker.settings import Settings

pytestmark = pytest.mark.model


def test_vectors_match_sentence_transformers_on_1000_corpus_texts(
    engine: Engine,
    checkpoint: Path,
    corpus: list[str],
    reference_vectors: Callable[[list[str]], np.ndarray],
) -> None:
    longest = sorted(range(len(corpus)), key=lambda i: len(corpus[i]), reverse=True)[:50]
    spread = [i for i in range(0, len(corpus), len(corpus) // 950)][:950]
    texts = [corpus[i] for i in spread + longest]
    assert len(texts) == 1000

    # sentence-transformers reads its sequence length here (256: the tokenizer files say 128)
    st_config = json.loads((checkpoint / "sentence_bert_config.json").read_text())
    assert st_config["max_seq_length"] == 256
    expected = reference_vectors(texts)

    encoded = []
    for start in range(0, 1000, 250):
        encoded.append(engine.encode(texts[start : start + 250]))
    got = np.concatenate([e.vectors for e in encoded])

    assert got.shape == (1000, 384) and got.dtype == np.float32
    assert float(np.min(cosines(got, expected))) >= 0.9999
    # Texts over 256 tokens were cut, and counted: as many as a bare tokenizer finds.
    from tokenizers import Tokenizer

    bare = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    bare.no_truncation()
    over = sum(1 for e in bare.encode_batch(texts) if len(e.ids) > 256)
    assert over >= 40
    assert sum(e.stats.truncated for e in encoded) == over


def test_truncation_is_at_the_models_256_tokens_not_the_tokenizer_files_128(engine: Engine) -> None:
    stats = engine.encode(["word " * 1000]).stats
    assert (stats.tokens, stats.truncated) == (256, 1)
    stats = engine.encode(["word " * 200]).stats  # 200 words + [CLS] + [SEP]: fits
    assert (stats.tokens, stats.truncated) == (202, 0)


def test_a_10_mb_text_is_cut_before_tokenising(engine: Engine) -> None:
    huge = "lorem ipsum dolor sit amet " * 400_000
    result = engine.encode([huge, "short"])
    assert result.stats.tokens == 256 + 3
    assert result.stats.truncated == 1
    np.testing.assert_allclose(
        result.vectors[0], engine.encode(["lorem ipsum dolor sit amet " * 60]).vectors[0], atol=1e-5
    )


def test_input_order_survives_length_sorting(engine: Engine, corpus: list[str]) -> None:
    texts = [corpus[i] for i in (5, 900, 17, 31000, 2, 444, 12000, 7)] + ["x", "a b c " * 90]
    together = engine.encode(texts).vectors
    alone = np.concatenate([engine.encode([t]).vectors for t in texts])
    assert float(np.min(cosines(together, alone))) >= 0.99999
    # and each vector is its own text's, not a neighbour's after the sort
    nearest = np.argmax(together @ alone.T, axis=1)
    assert nearest.tolist() == list(range(len(texts)))


def test_every_call_reports_its_statistics(engine: Engine, short_texts: list[str]) -> None:
    stats = engine.encode(short_texts[:100]).stats
    assert stats.texts == 100
    assert 0 < stats.tokens <= stats.padded_tokens
    assert stats.micro_batches >= 2
    assert stats.tokenize_ms > 0 and stats.inference_ms > 0 and stats.pool_ms > 0
    assert stats.provider == "CPUExecutionProvider"


def test_bad_batches_fail_whole_with_a_typed_error(engine: Engine) -> None:
    for bad in ([], ["fine", "  "], ["fine", 7], ["x"] * 1025):
        with pytest.raises(InputError):
            engine.encode(bad)


def test_asking_for_cuda_on_a_cpu_machine_falls_back_loudly(
    minilm: Path, store_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(model_dir=store_root, providers=["CUDAExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="worker.providers"):
        engine = Engine.load(minilm, settings)
    if engine.provider == "CUDAExecutionProvider":
        pytest.skip("this machine has a working CUDA: nothing falls back")
    assert engine.provider == "CPUExecutionProvider"
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert "CUDAExecutionProvider was requested but could not be used" in message
    assert "running on CPUExecutionProvider" in message
    assert "onnxruntime did not create it" not in message  # the real reason was captured
    assert engine.encode(["still works"]).vectors.shape == (1, 384)


def test_fallback_can_be_made_an_error(minilm: Path, store_root: Path) -> None:
    settings = Settings(
        model_dir=store_root, providers=["CUDAExecutionProvider"], provider_fallback="error"
    )
    try:
        engine = Engine.load(minilm, settings)
    except ProviderError as exc:
        assert "EMBEDQ_PROVIDER_FALLBACK=error" in str(exc)
    else:
        assert engine.provider == "CUDAExecutionProvider", "fell back without an error"


def test_a_provider_missing_from_the_build_is_named_as_such(
    minilm: Path, store_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(model_dir=store_root, providers=["ROCMExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="worker.providers"):
        engine = Engine.load(minilm, settings)
    assert engine.provider == "CPUExecutionProvider"
    assert "this onnxruntime build does not include it" in caplog.text


def test_progress_is_reported_after_each_micro_batch(
    engine: Engine, short_texts: list[str]
) -> None:
    seen: list[tuple[int, int]] = []
    result = engine.encode(
        short_texts[:100], on_progress=lambda done, total: seen.append((done, total))
    )
    assert len(seen) == result.stats.micro_batches and seen[-1] == (100, 100)
    assert all(a[0] < b[0] for a, b in itertools.pairwise(seen))
