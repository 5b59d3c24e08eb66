"""``pip install embedq`` is the client side; the runtime is the ``worker`` extra. A command that
needs the extra on a client install ends with the line naming it and exit 2, never an
ImportError traceback. A client install is simulated by running ``embedq`` in a process of its
own where the extra's modules cannot be imported (``sys.modules[name] = None``);
tests/acceptance/test_client_install.py builds a real one. Moved from tests/unit, which starts
no process (the names themselves are checked there, in test_worker_extra.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.cli.failures import Code, command_path
from worker.extra import EXTRA as WORKER_EXTRA

HIDE_EXTRA = f"import sys; sys.modules.update(dict.fromkeys({sorted(WORKER_EXTRA)!r}))"


def run_hidden(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``embedq ARGS`` in a process where the worker extra's modules cannot be imported."""
    code = f"{HIDE_EXTRA}; from tasks.cli import main; sys.argv[1:] = {args!r}; main()"
    env = {
        **os.environ,
        "EMBEDQ_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "EMBEDQ_MODEL_DIR": str(tmp_path / "models"),
    }
    env.pop("EMBEDQ_BROKER_URL", None)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    "args",
    [
        ["worker"],
        ["flower", "--insecure-no-auth"],
        ["models", "pull", "hf://org/m", "--name", "m"],
        ["models", "list"],
        ["encode", "--model", "m", "-f", "texts.jsonl"],
    ],
    ids=lambda args: "-".join(args[:2]),
)
def test_a_worker_command_on_a_client_install_names_the_extra(
    args: list[str], tmp_path: Path
) -> None:
    done = run_hidden(args, tmp_path)
    assert done.returncode == Code.INPUT, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        f"error: {command_path(args, {'models'})} needs the worker extra ("
    )
    assert done.stderr.rstrip().endswith("is not installed): pip install 'embedq[worker]'")


def test_local_mode_on_a_client_install_says_to_set_the_broker_and_records_no_job(
    tmp_path: Path,
) -> None:
    done = run_hidden(["embed", "--model", "m", "some text"], tmp_path)
    assert done.returncode == Code.INPUT, done.stderr
    assert "EMBEDQ_BROKER_URL is not set" in done.stderr
    assert "pip install 'embedq[worker]'" in done.stderr
    assert not (tmp_path / "store.db").exists()  # refused before the job was recorded
