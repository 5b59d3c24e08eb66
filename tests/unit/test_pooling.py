import numpy as np
import pytest

from worker import pooling
from worker.manifest import Pooling

TOKENS = np.array(
    [
        [[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],  # two real tokens, one padded
        [[2.0, 0.0], [0.0, 2.0], [4.0, -4.0]],  # three real tokens
    ],
    dtype=np.float32,
)
MASK = np.array([[1, 1, 0], [1, 1, 1]], dtype=np.int64)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (Pooling.MEAN, [[2.0, 3.0], [2.0, -2.0 / 3.0]]),
        (Pooling.CLS, [[1.0, 2.0], [2.0, 0.0]]),
        (Pooling.MAX, [[3.0, 4.0], [4.0, 2.0]]),
        (
            Pooling.MEAN_SQRT_LEN,
            [[4.0 / np.sqrt(2), 6.0 / np.sqrt(2)], [6.0 / np.sqrt(3), -2.0 / np.sqrt(3)]],
        ),
        (Pooling.LAST_TOKEN, [[3.0, 4.0], [4.0, -4.0]]),
    ],
)
def test_pooling_ignores_padded_positions(mode: Pooling, expected: list[list[float]]) -> None:
    np.testing.assert_allclose(pooling.pool(TOKENS, MASK, mode), expected, rtol=1e-6)


def test_none_pooling_passes_sentence_vectors_through() -> None:
    vectors = np.ones((2, 4), dtype=np.float32)
    assert pooling.pool(vectors, MASK, Pooling.NONE) is vectors


def test_l2_normalize_gives_unit_rows_and_keeps_zero_rows_finite() -> None:
    out = pooling.l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    assert out.dtype == np.float32
