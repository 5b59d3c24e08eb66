"""Real faults for the fault tests: a TCP proxy that can cut a database off, a private Redis that
can be killed and restarted empty, a process that holds SQLite's write lock, and a thread that
kills whichever worker process claims one batch.

Nothing here is a mock: each helper breaks a real service or process the way production breaks
it, so the pipeline's own code (retries, the ledger, the reconciler) has to recover for real.
Each helper is checked by itself in ``test_services.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

from storage.session import make_engine
from tests.processes import free_port


class TcpProxy:
    """A loopback TCP proxy to ``target``, run by an asyncio loop on a thread of the test.

    ``stop()`` closes the listening socket (new connections are refused) and aborts every open
    connection both ways (a reset, as when a database host goes away); ``start()`` listens on
    the same port again.
    """

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def listening(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        """Stop and end the loop's thread."""
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, work: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(work, self._loop).result(30)

    async def _start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.port, reuse_address=True
            )

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()  # the listening socket first: nothing new gets in
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # accepted while stopping
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        pair = {writer, up_writer}
        self._open |= pair
        try:
            await asyncio.gather(
                self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
            )
        finally:
            self._open -= pair
            for end in pair:
                end.transport.abort()

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(1 << 16):
                sink.write(data)
                await sink.drain()
        finally:
            sink.transport.abort()  # one side ended: end the other, as a dead host would


def through(proxy: TcpProxy, database_url: str) -> str:
    """``database_url`` with its host and port replaced by the proxy's."""
    url = make_url(database_url).set(host="127.0.0.1", port=proxy.port)
    return url.render_as_string(hide_password=False)


_LOCKER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], timeout=120, isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("ROLLBACK")
print("released", flush=True)
"""


class SqliteLocker:
    """Another process that holds the write lock of a SQLite file for ``seconds``.

    The store runs SQLite in WAL mode, where ``BEGIN EXCLUSIVE`` takes the same WAL write lock
    as ``BEGIN IMMEDIATE``: every other writer waits (its busy timeout, then "database is
    locked") while readers go on reading the last committed state.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.process: subprocess.Popen[str] | None = None
        self.locked_at = 0.0

    def hold(self, seconds: float, timeout: float = 120) -> None:
        """Start the locker and return once it holds the lock (it may first wait for a writer
        that is mid-transaction)."""
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LOCKER, str(self.path), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        ready = threading.Event()
        first: list[str] = []

        def read_first() -> None:
            assert self.process is not None and self.process.stdout is not None
            first.append(self.process.stdout.readline())
            ready.set()

        threading.Thread(target=read_first, daemon=True).start()
        if not ready.wait(timeout) or first[0].strip() != "locked":
            self.release()
            raise RuntimeError(f"could not lock {self.path}: {first}")
        self.locked_at = time.monotonic()

    def wait(self, timeout: float = 180) -> None:
        """Block until the locker has let go."""
        if self.process is not None:
            self.process.communicate(timeout=timeout)
            self.process = None

    def release(self) -> None:
        """End the locker now (its transaction rolls back)."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.communicate(timeout=10)
            self.process = None


class PoisonKiller:
    """A thread that SIGKILLs every process that claims one batch, so that batch kills its
    worker each time it runs.

    It watches the ledger row (``batches``: job_id, batch_index, attempts, worker = "host:pid")
    and kills the pid in ``worker`` each time ``attempts`` goes up while the batch is still
    ``sent``. It only ever kills a process in ``process_group`` (the worker under test, which
    runs in its own session), never anything else the row might name.
    """

    def __init__(self, database_url: str, job_id: str, batch_index: int, process_group: int):
        self.job_id = job_id
        self.batch_index = batch_index
        self.process_group = process_group
        self.killed: list[int] = []
        self.refused: list[str] = []
        self.error: BaseException | None = None
        self._database = make_engine(database_url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PoisonKiller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._database.dispose()

    def _watch(self) -> None:
        try:
            self._follow()
        except Exception as exc:  # shown by the test that started it
            self.error = exc

    def _follow(self) -> None:
        query = text(
            "SELECT attempts, worker, state FROM batches WHERE job_id = :job AND batch_index = :i"
        )
        seen = 0
        while not self._stop.is_set():
            with self._database.connect() as connection:
                row = connection.execute(query, {"job": self.job_id, "i": self.batch_index}).first()
            if row is not None:
                attempts, worker, state = int(row[0] or 0), row[1], str(row[2])
                if state != "sent":
                    return
                if attempts > seen and worker:
                    seen = attempts
                    self._kill(int(str(worker).rsplit(":", 1)[1]), str(worker))
            self._stop.wait(0.02)

    def _kill(self, pid: int, worker: str) -> None:
        try:
            if pid == os.getpid() or os.getpgid(pid) != self.process_group:
                self.refused.append(worker)
                return
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.killed.append(pid)


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (a Celery worker's pool), read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found
