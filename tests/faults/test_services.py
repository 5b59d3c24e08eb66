"""The fault injectors themselves do what the scenarios rely on."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_ADMIN, require
from tests.faults.services import PoisonKiller, SqliteLocker, TcpProxy, children
from tests.processes import PrivateRedis
from tests.waiting import wait_until


def _postgres(port: int) -> psycopg.Connection[tuple[object, ...]]:
    url = make_url(POSTGRES_ADMIN)
    return psycopg.connect(
        host="127.0.0.1",
        port=port,
        user=url.username,
        dbname=url.database,
        connect_timeout=3,
        autocommit=True,
    )


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    url = make_url(POSTGRES_ADMIN)
    try:
        _postgres(url.port or 5432).close()
    except psycopg.OperationalError as exc:
        require(False, f"PostgreSQL is not reachable at {POSTGRES_ADMIN}: {exc}")
    running = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    running.start()
    yield running
    running.close()


def test_a_stopped_proxy_refuses_connections_cuts_open_ones_and_comes_back_on_its_port(
    proxy: TcpProxy,
) -> None:
    held = _postgres(proxy.port)
    assert held.execute("select 1").fetchone() == (1,)

    proxy.stop()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="refused"):
        _postgres(proxy.port)
    assert time.monotonic() - started < 2  # refused, not timed out
    with pytest.raises(psycopg.OperationalError):
        held.execute("select 1")
    held.close()

    proxy.start()
    again = _postgres(proxy.port)
    assert again.execute("select 2").fetchone() == (2,)
    again.close()
    assert proxy.accepted == 2


def test_a_restarted_private_redis_is_empty_and_on_the_same_port(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    try:
        server.start()
        client = server.client()
        client.rpush("interactive", "a batch")
        first = server.process
        server.restart()
        assert server.process is not first and first is not None and first.returncode == -9
        assert client.ping()  # the same port, reconnected
        assert client.exists("interactive") == 0 and client.dbsize() == 0
        client.close()
        server.kill()
        with pytest.raises(redis.ConnectionError):
            server.client().ping()
    finally:
        server.kill()


def test_the_sqlite_locker_makes_writers_wait_then_fail_while_readers_go_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    setup = sqlite3.connect(path)
    assert setup.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)  # as the store runs
    setup.execute("CREATE TABLE t (x INTEGER)")
    setup.execute("INSERT INTO t VALUES (1)")
    setup.commit()
    setup.close()

    locker = SqliteLocker(path)
    locker.hold(2)
    try:
        writer = sqlite3.connect(path, timeout=0.2)
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            writer.execute("INSERT INTO t VALUES (2)")
        assert 0.15 < time.monotonic() - started < 1.5  # it waited its busy timeout
        writer.rollback()
        assert writer.execute("SELECT count(*) FROM t").fetchone() == (1,)  # WAL: reads go on
        locker.wait(timeout=10)
        assert time.monotonic() - locker.locked_at >= 2
        writer.execute("INSERT INTO t VALUES (2)")
        writer.commit()
        writer.close()
    finally:
        locker.release()


def test_the_poison_killer_kills_each_new_claimant_of_its_batch_and_only_in_its_group(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    store = sqlite3.connect(path, isolation_level=None)
    store.execute("PRAGMA journal_mode=WAL")
    store.execute(
        "CREATE TABLE batches (job_id TEXT, batch_index INTEGER, state TEXT, attempts INTEGER,"
        " worker TEXT)"
    )
    store.execute("INSERT INTO batches VALUES ('job', 3, 'sent', 0, NULL)")
    # A stand-in worker: a parent in its own session, and its pool child, both asleep.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); time.sleep(60)",
        ],
        start_new_session=True,
    )
    outsider = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (child,) = wait_until(
            lambda: children(parent.pid), 10, "the stand-in pool child", every=0.02
        )

        def claim(attempts: int, pid: int) -> None:
            store.execute("UPDATE batches SET attempts = ?, worker = ?", (attempts, f"host:{pid}"))

        def dead(pid: int) -> bool:
            return wait_until(
                lambda: pid not in children(parent.pid), 5, f"pool child {pid} killed", every=0.02
            )

        with PoisonKiller(f"sqlite:///{path}", "job", 3, parent.pid) as killer:
            claim(1, child)
            assert dead(child)
            claim(1, parent.pid)  # no new claim: left alone
            time.sleep(0.3)
            assert parent.poll() is None
            claim(2, outsider.pid)  # a claimant outside the worker's group: never killed
            time.sleep(0.3)
            assert outsider.poll() is None and killer.refused == [f"host:{outsider.pid}"]
            claim(3, parent.pid)
            assert parent.wait(5) == -signal.SIGKILL
            store.execute("UPDATE batches SET state = 'failed'")
        assert killer.killed == [child, parent.pid] and killer.error is None
    finally:
        for process in (parent, outsider):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        store.close()
