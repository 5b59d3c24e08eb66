"""What a batch does when its host lacks the model: the decisions in ``tasks.preparation.request``,
on a real SQLite store, with the broker replaced by a list of sent messages."""

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from storage import leases, model_catalog
from storage.models import Lease, ModelState, PreparedModel
from storage.session import make_engine, scope, session_factory
from tasks import model_options, names, preparation
from worker.errors import InputError, ModelError, ModelNotFoundError
from worker.settings import Settings

HOST = "gpu-host-1"


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(sqlite_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[Any], str]]:
    messages: list[tuple[str, list[Any], str]] = []

    def send_task(name: str, args: list[Any], queue: str, connection: Any) -> None:
        # On the settings' broker (never reached here), not the Celery app's default one.
        assert (connection.hostname, connection.port, connection.virtual_host) == (
            "127.0.0.1",
            6399,
            "5",
        )
        messages.append((name, args, queue))

    # The Celery app ``preparation`` sends downloads with, its sending replaced (no broker).
    monkeypatch.setattr(preparation.app, "send_task", send_task)
    return messages


@pytest.fixture
def settings(sqlite_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=sqlite_url,
        broker_url="redis://127.0.0.1:6399/5",
        host_name=HOST,
        model_dir=tmp_path / "models",
        download_time_limit=100,
    )


def state(sessions: sessionmaker[Session], name: str) -> PreparedModel | None:
    with scope(sessions) as session:
        row = model_catalog.get_prepared(session, name, HOST)
        if row is not None:
            session.expunge(row)
        return row


def test_an_unregistered_model_fails_with_how_to_provide_it(
    sessions: sessionmaker[Session], settings: Settings, sent: list[Any]
) -> None:
    with pytest.raises(ModelNotFoundError, match="embedq models register SOURCE --name m"):
        preparation.request("m", sessions, settings)
    assert sent == []


def test_one_download_is_sent_to_this_host_and_the_batch_waits(
    sessions: sessionmaker[Session], settings: Settings, sent: list[Any]
) -> None:
    with scope(sessions) as session:
        model_catalog.register_source(session, "m", "hf://org/m", {"precision": "int8"})
    for _ in range(3):  # three batches of jobs needing it
        with pytest.raises(preparation.ModelPendingError, match="being prepared on gpu-host-1"):
            preparation.request("m", sessions, settings)
    assert sent == [(names.DOWNLOAD, ["m"], "download.gpu-host-1")]
    row = state(sessions, "m")
    assert row is not None and row.state == ModelState.PREPARING


def test_a_download_that_went_quiet_is_asked_for_again(
    sessions: sessionmaker[Session], settings: Settings, sent: list[Any]
) -> None:
    with scope(sessions) as session:
        model_catalog.register_source(session, "m", "hf://org/m", {})
    with pytest.raises(preparation.ModelPendingError):
        preparation.request("m", sessions, settings)
    with pytest.raises(preparation.ModelPendingError):  # asked a moment ago: not again
        preparation.request("m", sessions, settings)
    assert len(sent) == 1
    with scope(sessions) as session:  # its worker died: nobody renewed the lease
        lapsed = datetime.now(UTC) - timedelta(seconds=1)
        session.execute(update(Lease).values(expires_at=lapsed))
    with pytest.raises(preparation.ModelPendingError):
        preparation.request("m", sessions, settings)
    assert len(sent) == 2


def test_a_worker_preparing_a_model_renews_its_lease_and_gives_it_up_at_the_end(
    sessions: sessionmaker[Session], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the pull runs, the lease is held past its first term; afterwards it is gone."""
    lease = preparation.preparing("m", settings.host_name)
    seen: list[bool] = []

    class SlowStore:
        def __init__(self, root: object) -> None:
            pass

        def pull(self, *args: object, **kwargs: object) -> object:
            for _ in range(4):  # longer than the lease: only renewals keep it
                time.sleep(0.1)
                with scope(sessions) as session:
                    seen.append(leases.held(session, lease))
            raise ModelError("stop here")

    from worker import model_store

    monkeypatch.setattr(model_store, "ModelStore", SlowStore)
    with scope(sessions) as session:
        model_catalog.register_source(session, "m", "hf://org/m", {})
    short = settings.model_copy(update={"download_lease": 0.15})
    with pytest.raises(ModelError, match="stop here"):
        preparation.prepare_here("m", sessions, short)
    assert seen == [True, True, True, True]
    with scope(sessions) as session:
        assert not leases.held(session, lease)


def test_a_recorded_failure_fails_the_batch_until_the_model_is_registered_again(
    sessions: sessionmaker[Session], settings: Settings, sent: list[Any]
) -> None:
    with scope(sessions) as session:
        model_catalog.register_source(session, "m", "/nowhere", {})
    with pytest.raises(ModelNotFoundError, match="unknown model source '/nowhere'"):
        preparation.prepare_here("m", sessions, settings)
    row = state(sessions, "m")
    assert row is not None and row.state == ModelState.FAILED
    with pytest.raises(ModelError, match="could not be prepared on gpu-host-1: unknown model"):
        preparation.request("m", sessions, settings)
    assert sent == []

    with scope(sessions) as session:
        model_catalog.register_source(session, "m", "hf://org/fixed", {})
    assert state(sessions, "m") is None
    with pytest.raises(preparation.ModelPendingError):
        preparation.request("m", sessions, settings)
    assert len(sent) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"precision": "int4"}, "bad model option"),
        ({"pooling": "median"}, "bad model option"),
        ({"quantise": "int8"}, "unknown model options"),
    ],
)
def test_catalog_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        model_options.check_options(options)


def test_catalog_options_become_pull_options() -> None:
    options = model_options.pull_options(
        {"precision": "int8", "pooling": "cls", "normalize": False}
    )
    assert (str(options.precision), str(options.pooling), options.normalize) == (
        "int8",
        "cls",
        False,
    )
