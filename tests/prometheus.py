"""Reading a worker's Prometheus ``/metrics`` in a test: each series and its value."""

from __future__ import annotations

import urllib.request


def scrape(port: int) -> dict[str, float]:
    """Each series on ``/metrics`` at ``port`` (name with its labels) and its value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def total(values: dict[str, float], prefix: str) -> float:
    """The sum of the series whose name (with labels) starts with ``prefix``."""
    return sum(v for k, v in values.items() if k.startswith(prefix))
