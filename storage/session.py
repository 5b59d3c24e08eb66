"""Database engines and session scopes.

``storage`` never reads settings: callers hand it a URL. SQLite gets WAL and a busy timeout on
every connection, so a reader never blocks the writer and concurrent writers wait instead of
failing with "database is locked"; and ``synchronous=NORMAL``, the setting SQLite recommends
with WAL: no fsync per commit (2 ms here, a tenth of a one-text job), never a corrupt file, and
a commit survives a killed process; only a power loss or OS crash can undo the last commits.
Engines are made per process (after a worker forks), never shared across a fork.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite connections are set up for concurrent use."""
    if url.startswith("postgresql"):
        # A server that does not answer (not one that refuses) must not hang a worker forever.
        kwargs.setdefault("connect_args", {"connect_timeout": 10})
    engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"), **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back when it raises."""
    with factory() as session, session.begin():
        yield session


# One engine per URL per process. A forked child must not use its parent's pooled connections:
# it drops them without closing them (closing would cut the parent's sockets), as SQLAlchemy
# documents for multiprocessing, and opens its own.
_owner_pid = 0
_engines: dict[str, Engine] = {}


def sessions_for(url: str) -> sessionmaker[Session]:
    """A session factory on ``url``, sharing this process's engine for it."""
    global _owner_pid
    if _owner_pid != os.getpid():
        for inherited in _engines.values():
            inherited.dispose(close=False)
        _engines.clear()
        _owner_pid = os.getpid()
    if url not in _engines:
        _engines[url] = make_engine(url)
    return session_factory(_engines[url])


def dispose_all() -> None:
    """Close every connection this process holds (at shutdown, or between tests)."""
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()
