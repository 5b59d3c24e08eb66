"""The ``embedq`` command run in the test's own process, as the entry point runs it.

Starting the installed entry point costs a second or two of imports per run; calling
``tasks.cli.main`` here costs milliseconds, and checks the same things: the exit code, what
goes to stdout and stderr, the traceback ``--verbose`` prints. What only a real process shows
(the entry point itself, ``python -m tasks.cli``, log lines on a real stderr) is in
``tests/acceptance/test_cli_processes.py``.

A run sees only the ``EMBEDQ_*`` settings it is given (those of the test's process are
removed), and starts as a fresh process would: settings read anew, the Celery app configured
from them, no connection kept from an earlier run. Log lines of a command that runs batches
here (local mode) go to logging (pytest's log capture), not to the captured stderr.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import pydantic
import pytest

from worker.settings import get_settings


class Result(NamedTuple):
    """How one run of the command ended: ``code, stdout, stderr = cli(...)``."""

    code: int
    stdout: str
    stderr: str

    def shown(self) -> str:
        """The run, for an assertion's message."""
        return f"exit {self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def assert_ends_with_one_error(
    result: Result,
    code: int,
    says: str,
    before: str | None = None,
    secrets: Sequence[str] = (),
) -> str:
    """The run exited ``code`` and its stderr is one ``error:`` line holding ``says`` (after
    lines matching ``before``, where a case has notices); no traceback, none of ``secrets``.
    Returns the line."""
    shown = result.shown()
    assert result.code == code, shown
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), shown
    for line in lines[:-1]:
        assert before is not None and re.match(before, line), shown
    assert says in lines[-1], shown
    assert "Traceback" not in result.stderr, shown
    for secret in secrets:
        assert secret not in result.stderr + result.stdout, shown
    return lines[-1]


class Cli:
    """Runs ``embedq ARGS`` in this process under the settings ``env`` names."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
        self.monkeypatch = monkeypatch
        self.capsys = capsys

    def __call__(self, *args: str, env: Mapping[str, str] | None = None) -> Result:
        from tasks import cli

        with self.monkeypatch.context() as patch:
            for key in [k for k in os.environ if k.startswith("EMBEDQ_")]:
                patch.delenv(key)
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            patch.setattr(sys, "argv", ["embedq", *args])
            get_settings.cache_clear()
            _configure_celery_app()
            self.capsys.readouterr()  # what the test printed before is not the command's
            try:
                cli.main()
            except SystemExit as exc:
                code = int(exc.code) if isinstance(exc.code, int) else int(exc.code is not None)
            else:
                raise AssertionError("tasks.cli.main returned without exiting")
            finally:
                _close_connections()
                get_settings.cache_clear()
            out, err = self.capsys.readouterr()
        return Result(code, out, err)


def _configure_celery_app() -> None:
    """Configure the Celery app from this run's settings, as a new process would on first use
    (the app reads its configuration once: an earlier run here may have configured it)."""
    app_module = sys.modules.get("worker.app")
    if app_module is None or not app_module.app.configured:
        return  # configured from the settings when this run first uses it
    try:
        settings = get_settings()
    except pydantic.ValidationError:
        return  # the command reports the invalid setting itself
    app_module.app.conf.update(app_module.config(settings))


def _close_connections() -> None:
    """Close what a run leaves open (a process would end here): database engines, Redis
    clients, broker producers and the Celery app's connection pool."""
    from storage.session import dispose_all
    from tasks import completion, publishing

    dispose_all()
    completion.close()
    publishing.close()
    app_module = sys.modules.get("worker.app")
    if app_module is not None:
        app_module.app.close()
