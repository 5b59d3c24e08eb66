"""``embedq`` run as a user runs it, in a process of its own, with a fleet's settings; and the
JSON Lines sources it reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_jsonl(path: Path, rows: Mapping[str, str]) -> Path:
    """``{"id", "text"}`` per line, in ``rows``' order."""
    with path.open("w", encoding="utf-8") as handle:
        for item, text in rows.items():
            handle.write(json.dumps({"id": item, "text": text}) + "\n")
    return path


def embedq(env: Mapping[str, str], *args: str, timeout: float = 600) -> str:
    """Run ``embedq ARGS`` with ``env`` added to this process's environment; its stdout (the
    run must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"embedq {' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


def embedq_json(env: Mapping[str, str], *args: str) -> Any:
    """``embedq ARGS --json``, its output parsed."""
    return json.loads(embedq(env, *args, "--json"))
