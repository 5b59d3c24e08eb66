"""Engine.encode on the real model puts every vector back at its text's place in the input (the
property on a stand-in session: tests/unit/test_engine_order.py). Moved from tests/unit, which
loads no model."""

from __future__ import annotations

import numpy as np

from worker.engine import Engine


def test_the_real_model_gives_the_same_vectors_to_a_shuffled_list(
    engine: Engine, corpus: list[str]
) -> None:
    texts = corpus[:50]
    order = np.random.default_rng(9).permutation(len(texts))
    straight = engine.encode(texts).vectors
    shuffled = engine.encode([texts[i] for i in order]).vectors
    assert np.allclose(shuffled, straight[order], atol=1e-5)
