"""The unit layer needs no service, no model and no subprocess: a test here that opens a network
connection or starts a process fails at once, naming what it tried, instead of passing on a
machine where the service happens to run (and taking its time)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


class LayerError(AssertionError):
    """Raised when a unit test reaches for a service or a process."""


@pytest.fixture(scope="session", autouse=True)
def _matplotlib_font_list() -> None:
    """matplotlib lists the machine's fonts with ``fc-list`` the first time it is imported on a
    machine (then keeps the list in its cache): that is the library setting itself up, done
    here before the guard below, not a process a test starts."""
    with contextlib.suppress(ImportError):  # the plot extra is optional
        import matplotlib.font_manager  # noqa: F401


@pytest.fixture(autouse=True)
def _no_services_or_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    connect = socket.socket.connect

    def refuse(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise LayerError(f"a unit test connects to {address}: it belongs in integration")
        connect(self, address)

    def no_process(*args: Any, **kwargs: Any) -> None:
        raise LayerError(f"a unit test starts a process {args[1:2]}: it belongs elsewhere")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    yield
