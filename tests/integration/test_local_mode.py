"""Local mode: no broker configured, the producer runs the same task code in-process."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cosines
from worker import lifecycle
from worker.engine import Engine
from worker.settings import get_settings

pytestmark = pytest.mark.model


@pytest.fixture
def local_env(
    tmp_path: Path, minilm: Path, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'data' / 'embedq.db'}"
    monkeypatch.delenv("EMBEDQ_BROKER_URL", raising=False)
    monkeypatch.setenv("EMBEDQ_DATABASE_URL", url)
    monkeypatch.setenv("EMBEDQ_MODEL_DIR", str(store_root))
    monkeypatch.setenv("EMBEDQ_DEFAULT_MODEL", "minilm")
    monkeypatch.setenv("EMBEDQ_PROVIDERS", "CPUExecutionProvider")
    get_settings.cache_clear()
    yield url
    from tasks import producer

    producer.dispose()
    lifecycle.close()


def test_local_mode_needs_no_broker_and_no_prepared_database(
    local_env: str, engine: Engine, corpus: list[str]
) -> None:
    from tasks import producer

    texts = corpus[100:250]
    job = producer.submit(texts, tag="laptop")
    assert job.wait(timeout=5)["state"] == "succeeded"  # already done: it ran in-process
    ids, vectors = job.embeddings()
    assert ids == [str(i) for i in range(150)]
    assert float(np.min(cosines(vectors, engine.encode(texts).vectors))) >= 0.9999
