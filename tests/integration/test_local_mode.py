"""Local mode: no broker configured, the producer runs the same task code in-process."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from storage.session import dispose_all
from tasks import producer
from tests.conftest import cosines
from worker.engine import Engine
from worker.settings import Settings

pytestmark = pytest.mark.model


@pytest.fixture
def local(tmp_path: Path, minilm: Path, cpu_settings: Settings) -> Iterator[Settings]:
    """No broker, and a store in a folder that does not exist yet."""
    url = f"sqlite:///{tmp_path / 'data' / 'embedq.db'}"
    values = {"database_url": url, "broker_url": None, "default_model": "minilm"}
    yield cpu_settings.model_copy(update=values)
    dispose_all()


def test_local_mode_needs_no_broker_and_no_prepared_database(
    local: Settings, engine: Engine, short_texts: list[str]
) -> None:
    assert local.local_mode
    texts = short_texts[100:250]
    job = producer.submit(texts, tag="laptop", settings=local)
    assert job.broker_url is None
    assert job.wait(timeout=5)["state"] == "succeeded"  # already done: it ran in-process
    ids, vectors = job.embeddings()
    assert ids == [str(i) for i in range(150)]
    assert float(np.min(cosines(vectors, engine.encode(texts).vectors))) >= 0.9999
