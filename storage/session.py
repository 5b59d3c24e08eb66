"""Database engines and session scopes.

``storage`` never reads settings: callers hand it a URL. SQLite gets WAL and a busy timeout on
every connection (30 s, or the URL's ``?timeout=SECONDS``), so a reader never blocks the writer
and concurrent writers wait instead of failing with "database is locked"; and
``synchronous=NORMAL``, the setting SQLite recommends with WAL: no fsync per commit (2 ms here,
a tenth of a one-text job), never a corrupt file, and a commit survives a killed process; only
a power loss or OS crash can undo the last commits.
Engines are made per process (after a worker forks), never shared across a fork.

PostgreSQL connections are pinged at checkout only when they sat idle in the pool for over a
second (a ping on every checkout was a round trip on each of a one-text job's six
transactions); a connection that broke within that second fails its transaction, which the
callers retry as they retry any outage. ``commit_without_flush`` lets a transaction whose
loss a crash of the database server can afford commit without waiting for its WAL flush.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from storage import vector_extensions

SQLITE_BUSY_TIMEOUT_MS = 30_000
PING_AFTER_IDLE_S = 1.0


def redacted(url: str) -> str:
    """``url`` with its password hidden, for messages and logs (SQLAlchemy and Redis URLs
    alike)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: keep the scheme and the host only
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}" if rest else "(not a URL)"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite connections are set up for concurrent use."""
    if url.startswith("postgresql"):
        # A server that does not answer (not one that refuses) must not hang a worker forever.
        kwargs.setdefault("connect_args", {"connect_timeout": 10})
    if url.startswith("sqlite") and (driver := vector_extensions.sqlite_driver()) is not None:
        kwargs.setdefault("module", driver)
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        # The busy timeout in the URL (``sqlite:///path?timeout=SECONDS``, pysqlite's own
        # parameter), else 30 s.
        timeout = make_url(url).query.get("timeout")
        busy_ms = SQLITE_BUSY_TIMEOUT_MS if timeout is None else int(float(str(timeout)) * 1000)
        event.listen(engine, "connect", partial(_sqlite_pragmas, busy_ms=busy_ms))
    else:
        event.listen(engine, "checkout", _ping_if_idle(engine))
        event.listen(engine, "checkin", _note_checkin)
    return engine


def _ping_if_idle(engine: Engine) -> Any:
    """A checkout hook: ping a connection that sat idle; a dead one is replaced (SQLAlchemy
    retries the checkout when the hook raises ``DisconnectionError``)."""

    def ping(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("checked_in")
        if idle_since is not None and time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            raise exc.DisconnectionError(f"connection lost while idle: {error}") from error

    return ping


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in"] = time.monotonic()


def commit_without_flush(session: Session) -> None:
    """Let this transaction's commit return before its WAL reaches the disk (PostgreSQL's
    ``synchronous_commit`` off, for this transaction only; SQLite's WAL with
    ``synchronous=NORMAL`` does the same for every commit). A crash of the database server may
    forget the last ~0.6 s of such commits, never corrupts, and never leaves a later
    synchronous commit without them: it flushes the WAL up to itself."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(text("SET LOCAL synchronous_commit TO OFF"))


def _sqlite_pragmas(connection: Any, _record: Any, busy_ms: int) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # Checkpoint the WAL every 64 MB rather than every 4 MB: a batch of 128 vectors writes about
    # 50 pages, and a checkpoint every 20 batches doubled the write stage's commit time.
    cursor.execute("PRAGMA wal_autocheckpoint=16384")
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    vector_extensions.load_sqlite_vec(connection)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


class _ForkGate:
    """Keeps ``os.fork()`` out of this process's transactions.

    A Celery worker's parent writes to the store from threads (the reconciler, a batch whose
    pool process died) while its pool forks replacement children from another thread. A child
    forked in the middle of an SQLite transaction inherits SQLite's process-wide lock table in
    that state and then waits out the busy timeout on every write, for a lock nobody holds
    (seen in the poison-batch test). So a fork waits until no transaction is open, and no
    transaction starts while a fork is under way; transactions never wait for each other.
    """

    def __init__(self) -> None:
        self._state = threading.Condition()
        self._open = 0
        self._forking = False

    def enter(self) -> None:
        with self._state:
            while self._forking:
                self._state.wait()
            self._open += 1

    def leave(self) -> None:
        with self._state:
            self._open -= 1
            if not self._open:
                self._state.notify_all()

    def before_fork(self) -> None:
        self._state.acquire()
        self._forking = True
        while self._open:
            self._state.wait()

    def after_fork_in_parent(self) -> None:
        self._forking = False
        self._state.notify_all()
        self._state.release()

    def after_fork_in_child(self) -> None:
        self.__init__()  # type: ignore[misc]  # the child starts with no transaction open


_gate = _ForkGate()
os.register_at_fork(
    before=_gate.before_fork,
    after_in_parent=_gate.after_fork_in_parent,
    after_in_child=_gate.after_fork_in_child,
)


@contextmanager
def scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back when it raises."""
    _gate.enter()
    try:
        with factory() as session, session.begin():
            yield session
    finally:
        _gate.leave()


# One engine per URL per process. A forked child must not use its parent's pooled connections:
# it drops them without closing them (closing would cut the parent's sockets), as SQLAlchemy
# documents for multiprocessing, and opens its own.
_owner_pid = 0
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}


def sessions_for(url: str) -> sessionmaker[Session]:
    """A session factory on ``url``, sharing this process's engine for it."""
    global _owner_pid
    if _owner_pid != os.getpid():
        for inherited in _engines.values():
            inherited.dispose(close=False)
        _engines.clear()
        _factories.clear()
        _owner_pid = os.getpid()
    if url not in _engines:
        _engines[url] = make_engine(url)
        _factories[url] = session_factory(_engines[url])  # a sessionmaker builds a class
    return _factories[url]


def dispose_all() -> None:
    """Close every connection this process holds (at shutdown, or between tests)."""
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()
    _factories.clear()


def ping(session: Session) -> None:
    """One round trip to the store (raises when it cannot be reached)."""
    session.execute(text("select 1"))
