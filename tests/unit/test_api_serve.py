"""``embedq serve``: it refuses to run without keys or without a broker, binds to loopback by
default, and never prints a key. A command reads its settings from the environment, as a user
sets them, so these tests set the environment (read anew in each test: tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from tasks.api.auth import key_id
from tasks.cli import app

KEY = "sk-secret-value-1234"


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What uvicorn would have been asked to run (nothing is started)."""
    import uvicorn

    seen: dict[str, Any] = {}

    def run(app: object, **kwargs: Any) -> None:
        seen.update(kwargs, app=app)

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.setenv("EMBEDQ_BROKER_URL", "redis://127.0.0.1:1/0")  # never reached
    monkeypatch.setenv("EMBEDQ_DATABASE_URL", "sqlite:////nonexistent/never.db")
    return seen


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["serve", *args])


def test_serve_refuses_to_start_without_keys(
    started: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMBEDQ_API_KEYS", raising=False)
    result = invoke()
    assert result.exit_code == 2
    assert "set EMBEDQ_API_KEYS" in result.output and "--insecure-no-auth" in result.output
    assert started == {}


def test_serve_refuses_local_mode_since_it_runs_no_model(
    started: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMBEDQ_BROKER_URL")
    monkeypatch.setenv("EMBEDQ_API_KEYS", KEY)
    result = invoke()
    assert result.exit_code == 2 and "set EMBEDQ_BROKER_URL" in result.output
    assert started == {}


def test_serve_binds_to_loopback_by_default_and_shows_key_ids_only(
    started: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBEDQ_API_KEYS", f"{KEY},sk-second-secret")
    result = invoke()
    assert result.exit_code == 0, result.output
    assert (started["host"], started["port"]) == ("127.0.0.1", 8000)
    assert started["app"].state.require_auth is True
    assert started["access_log"] is True
    assert f"2 (ids {key_id(KEY)}, {key_id('sk-second-secret')})" in result.output
    assert KEY not in result.output and "sk-second-secret" not in result.output


def test_serve_without_auth_says_so_and_takes_host_and_port(
    started: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMBEDQ_API_KEYS", raising=False)
    result = invoke("--insecure-no-auth", "--host", "0.0.0.0", "--port", "9123", "--no-access-log")
    assert result.exit_code == 0, result.output
    assert "runs without authentication" in result.output
    assert (started["host"], started["port"]) == ("0.0.0.0", 9123)
    assert started["access_log"] is False
    assert started["app"].state.require_auth is False
