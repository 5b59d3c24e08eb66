"""What differs between SQLite and PostgreSQL when a query is built, in one place.

Writes that a redelivered batch may repeat are dialect upserts (``INSERT .. ON CONFLICT``), so
at-least-once delivery never duplicates a row; SQLAlchemy has no dialect-neutral upsert, so the
statement is picked by the session's dialect here and nowhere else. The statements every batch
runs are built once per dialect and executed with parameters (``prepared``): building them per
call (and a multi-row VALUES that compiles anew for each batch size) cost about as much as
embedding one short text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def upsert(session: Session, table: Any) -> Insert:
    """An ``INSERT`` on ``table`` that knows ``ON CONFLICT`` for the session's database."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"embedq stores on SQLite or PostgreSQL, not {dialect}")


_built: dict[tuple[str, str], Any] = {}


def prepared(session: Session, name: str, build: Callable[[Session], Any]) -> Any:
    """The statement ``name`` for the session's dialect, built by ``build`` the first time."""
    key = (session.get_bind().dialect.name, name)
    if key not in _built:
        _built[key] = build(session)
    return _built[key]
