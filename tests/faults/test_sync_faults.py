"""The faults of this folder struck during a sync (``embedq backfill NAME --source SRC --prune``
run again on an edited source): a worker killed, PostgreSQL refused, Redis restarted empty, the
sync itself killed and run again. Each ends with the collection exactly as the source is: one
vector per id of the source, none for an id it removed, each the engine's vector of the id's
current text, and, where the store keeps a vector index, the same vectors in it.

The collection is 600 texts; the edit changes half of them, removes 60 and adds 300, so the sync
embeds 600 texts in 12 batches (about ten seconds): the fault lands mid-sync.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from storage import collections, vector_index
from storage.session import make_engine, scope, sessions_for
from tests.commands import embedq_json, write_jsonl
from tests.conftest import SCENARIO, cosines
from tests.faults.services import TcpProxy, through
from tests.processes import PrivateRedis, Worker
from tests.waiting import wait_until

BASE, ADDED, REMOVED = 600, 300, 60


def corpus_pair(short_texts: list[str], scenario: int) -> tuple[dict[str, str], dict[str, str]]:
    """A collection's first source and its edit, of texts of the ``scenario``-th own."""
    texts = short_texts[scenario * 1000 : scenario * 1000 + BASE + ADDED]
    first = {f"s{i}": t for i, t in enumerate(texts[:BASE])}
    edited = {k: (f"{t} (edited)" if i % 2 == 0 else t) for i, (k, t) in enumerate(first.items())}
    for key in list(edited)[-REMOVED:]:
        del edited[key]
    edited.update({f"a{i}": t for i, t in enumerate(texts[BASE:])})
    return first, edited


class Sync:
    """``embedq backfill docs --source SOURCE --prune --json`` in a process of its own."""

    def __init__(self, env: dict[str, str], source: Path) -> None:
        command = [sys.executable, "-m", "tasks.cli", "backfill", "docs"]
        self.process = subprocess.Popen(
            [*command, "--source", str(source), "--prune", "--json"],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def result(self, timeout: float = 300) -> tuple[int, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out + err[-2000:]


def sync_until_mid_way(env: dict[str, str], source: Path, database_url: str) -> tuple[Sync, float]:
    """Start the sync, and return it (and when it started) once it has stored 150 vectors: the
    moment to strike, with the sync still running and most of its work ahead."""
    mark, started = highest_row(database_url), time.monotonic()
    sync = Sync(env, source)
    wait_until(lambda: stored_since(database_url, mark) >= 150, 120, "150 vectors of the sync")
    assert sync.process.poll() is None, "the sync ended before the fault"
    assert stored_since(database_url, mark) < BASE, "the sync had stored everything"
    return sync, started


def stored_since(database_url: str, mark: int) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            found = connection.execute(
                text("SELECT count(*) FROM embeddings WHERE id > :m"), {"m": mark}
            )
            return int(found.scalar_one())
    finally:
        engine.dispose()


def highest_row(database_url: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT max(id) FROM embeddings")).scalar_one())
    finally:
        engine.dispose()


def index_rows(session: Session, table: str) -> dict[str, bytes]:
    """What a vector index table holds: each id's float32 vector bytes."""
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        found = connection.exec_driver_sql(f"SELECT item_id, embedding FROM {table}")
        return {item: bytes(vector) for item, vector in found}
    found = connection.exec_driver_sql(f"SELECT item_id, embedding::real[] FROM {table}")
    return {item: np.array(vector, np.float32).tobytes() for item, vector in found}


def check_collection(
    database_url: str, source: dict[str, str], engine: Any
) -> tuple[int, int, int, bool]:
    """Assert the collection is the source, exactly; returns (ids, rows, stale, indexed)."""
    with scope(sessions_for(database_url)) as session:
        version = collections.current_version(session, "docs")
        assert version is not None
        rows = (
            session.connection()
            .execute(
                text("SELECT item_id, text_sha256, vector FROM embeddings WHERE job_id = :j"),
                {"j": version.job_id},
            )
            .all()
        )
        table = vector_index.table_name(version.job_id) if version.dim is not None else None
        indexed = {} if table is None else index_rows(session, table)
    ids = [row.item_id for row in rows]
    assert len(ids) == len(set(ids)), "an id stored twice"
    assert set(ids) == set(source), (set(source) - set(ids), set(ids) - set(source))
    stale = [
        row.item_id
        for row in rows
        if row.text_sha256 != hashlib.sha256(source[row.item_id].encode()).hexdigest()
    ]
    assert not stale, f"vectors of texts the source no longer has: {stale[:5]}"
    order = sorted(source)
    by_id = {row.item_id: np.frombuffer(row.vector, np.float32) for row in rows}
    expected = engine.encode([source[i] for i in order]).vectors
    assert float(np.min(cosines(np.stack([by_id[i] for i in order]), expected))) >= 0.9999
    if table is not None:  # the index holds the same vectors, no more, no fewer
        assert set(indexed) == set(source)
        assert all(indexed[i] == by_id[i].tobytes() for i in order)
    return len(set(ids)), len(ids), len(stale), table is not None


@pytest.fixture
def synced(
    start_worker: Callable[..., Worker], producer_env: dict[str, str], tmp_path: Path
) -> Callable[..., tuple[Worker, Path, dict[str, str]]]:
    """The collection synced from its first source by a worker; returns the worker, the edited
    source and its rows."""

    def make(
        short_texts: list[str], scenario: int, **worker_env: str
    ) -> tuple[Worker, Path, dict[str, str]]:
        first, edited = corpus_pair(short_texts, scenario)
        worker = start_worker("sync", **worker_env)
        summary = embedq_json(
            producer_env,
            "backfill",
            "docs",
            "--source",
            str(write_jsonl(tmp_path / "v1.jsonl", first)),
        )
        assert (summary["state"], summary["done"]) == ("succeeded", BASE)
        return worker, write_jsonl(tmp_path / "v2.jsonl", edited), edited

    return make


def settle(
    request: pytest.FixtureRequest,
    sync: Sync,
    database_url: str,
    source: dict[str, str],
    engine: Any,
    started: float,
) -> None:
    """Wait for the sync to succeed, check the collection, and report the scenario."""
    code, said = sync.result()
    assert code == 0, said
    ids, rows, stale, indexed = check_collection(database_url, source, engine)
    line = (
        f"{request.node.name}: source={len(source)} stored={ids} duplicated={rows - ids}"
        f" stale={stale} index={'same' if indexed else 'none'}"
        f" seconds={time.monotonic() - started:.1f}"
    )
    print(line)
    request.node.user_properties.append((SCENARIO, line))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_killed_mid_sync_and_replaced_leaves_the_collection_exact(
    synced: Callable[..., Any],
    start_worker: Callable[..., Worker],
    producer_env: dict[str, str],
    database_url: str,
    short_texts: list[str],
    engine: Any,
    request: pytest.FixtureRequest,
) -> None:
    worker, source, edited = synced(short_texts, 1)
    sync, started = sync_until_mid_way(producer_env, source, database_url)
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.stop()
    start_worker("rescuer")
    settle(request, sync, database_url, edited, engine, started)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgresql_refused_mid_sync_leaves_the_collection_exact(
    synced: Callable[..., Any],
    pg_proxy: TcpProxy,
    producer_env: dict[str, str],
    database_url: str,
    short_texts: list[str],
    engine: Any,
    request: pytest.FixtureRequest,
) -> None:
    _, source, edited = synced(short_texts, 2, EMBEDQ_DATABASE_URL=through(pg_proxy, database_url))
    # The worker reaches PostgreSQL through the proxy; the sync reads it directly.
    sync, started = sync_until_mid_way(producer_env, source, database_url)
    pg_proxy.stop()
    time.sleep(8)  # the outage itself
    pg_proxy.start()
    settle(request, sync, database_url, edited, engine, started)


@pytest.mark.parametrize("database_url", ["pgvector"], indirect=True)
def test_redis_restarted_empty_mid_sync_leaves_the_collection_exact(
    synced: Callable[..., Any],
    broker: PrivateRedis,
    producer_env: dict[str, str],
    database_url: str,
    short_texts: list[str],
    engine: Any,
    request: pytest.FixtureRequest,
) -> None:
    _, source, edited = synced(short_texts, 3)
    sync, started = sync_until_mid_way(producer_env, source, database_url)
    broker.restart()
    settle(request, sync, database_url, edited, engine, started)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_sync_killed_mid_run_and_run_again_leaves_the_collection_exact(
    synced: Callable[..., Any],
    producer_env: dict[str, str],
    database_url: str,
    short_texts: list[str],
    engine: Any,
    request: pytest.FixtureRequest,
) -> None:
    _, source, edited = synced(short_texts, 4)
    sync, started = sync_until_mid_way(producer_env, source, database_url)
    os.killpg(sync.process.pid, signal.SIGKILL)
    sync.result()
    again = Sync(producer_env, source)
    settle(request, again, database_url, edited, engine, started)
