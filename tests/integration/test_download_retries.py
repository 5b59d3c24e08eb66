"""A model source that cannot be reached: the ``download`` task tries it again with backoff,
then records the host's failure with the reason, on a real SQLite store with only the broker
(a list of sent messages) replaced. Moved from tests/unit, which opens no connection: the
source is a loopback port nothing listens on."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage import model_catalog
from storage.models import ModelState
from storage.session import dispose_all, make_engine, scope, session_factory
from tasks import download
from worker.app import app

HOST = "gpu-host-1"


@pytest.fixture
def sessions(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[sessionmaker[Session]]:
    """This process as a worker host: the download task, as a worker, reads its environment."""
    monkeypatch.setenv("EMBEDQ_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("EMBEDQ_HOST_NAME", HOST)
    monkeypatch.setenv("EMBEDQ_MODEL_DIR", str(tmp_path / "models"))
    sent: list[Any] = []
    monkeypatch.setattr(app, "send_task", lambda *a, **k: sent.append((a, k)))
    engine = make_engine(sqlite_url)
    yield session_factory(engine)
    engine.dispose()
    dispose_all()
    assert sent == [], "no download may be sent again for a recorded failure"


def test_an_unreachable_source_is_retried_then_recorded_failed(
    sessions: sessionmaker[Session],
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with scope(sessions) as session:
        model_catalog.register_source(session, "m", f"http://127.0.0.1:{port}/m.tar.gz", {})

    result = download.download.apply(args=["m"]).get()  # eager: the retries run here too

    with scope(sessions) as session:
        row = model_catalog.get_prepared(session, "m", HOST)
        assert row is not None
        assert row.state == ModelState.FAILED
        assert row.error is not None and row.error.startswith("gave up after 4 tries: ")
    assert "is not reachable" in result["failed"]
