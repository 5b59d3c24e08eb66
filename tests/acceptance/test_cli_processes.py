"""The ``embedq`` program as real processes: the installed entry point and ``python -m
tasks.cli``. What a command says and how it ends is checked in process (tests/integration/
test_cli.py and test_cli_errors.py); these runs check what only a process has: the entry point
``pip install`` wrote, the module's ``__main__``, and logging set up on a real stderr, where
the log lines of a batch run in this process (local mode) come before the one error line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.cli import Result, assert_ends_with_one_error


def embedq(*args: str, env: dict[str, str], module: bool = False) -> Result:
    """Run the command as a user does: the installed entry point (or ``python -m tasks.cli``),
    with no ``EMBEDQ_*`` setting but those in ``env``."""
    if module:
        command = [sys.executable, "-m", "tasks.cli"]
    else:
        executable = shutil.which("embedq", path=str(Path(sys.executable).parent))
        assert executable, "the embedq entry point is not installed (pip install -e .)"
        command = [executable]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    done = subprocess.run(
        [*command, *args], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    return Result(done.returncode, done.stdout, done.stderr)


def settings_for(tmp: Path) -> dict[str, str]:
    return {
        "EMBEDQ_MODEL_DIR": str(tmp / "models"),
        "EMBEDQ_DATABASE_URL": f"sqlite:///{tmp / 'store' / 'embedq.db'}",
        "EMBEDQ_PROVIDERS": "CPUExecutionProvider",
    }


def test_the_entry_point_logs_a_local_batch_then_ends_with_one_error_line(
    tmp_path: Path,
) -> None:
    result = embedq("embed", "text", "--model", "no-such-model", env=settings_for(tmp_path))
    line = assert_ends_with_one_error(
        result, 1, "failed: 0 done, 1 failed (model no-such-model:", r"(WARNING|INFO) "
    )
    assert line.startswith("error: job ")
    assert "WARNING tasks.batches: batch failed" in result.stderr  # logging reached stderr


def test_python_dash_m_ends_the_same_way(tmp_path: Path) -> None:
    (tmp_path / "latin1.jsonl").write_bytes(b'"fine"\n"caf\xe9"\n')
    result = embedq(
        "embed", "-f", str(tmp_path / "latin1.jsonl"), env=settings_for(tmp_path), module=True
    )
    assert_ends_with_one_error(result, 2, "latin1.jsonl:2 is not UTF-8 text (byte 0xe9")


def test_the_main_job_on_a_machine_without_a_gpu_prints_no_onnxruntime_error(
    tmp_path: Path, minilm: Path
) -> None:
    """What ``make run`` does, with the providers left to embedq: on a machine without an
    NVIDIA device a CUDA build of onnxruntime is not asked for CUDA, so it prints no red error
    for the libraries it cannot load; one quiet line says why the CPU runs it."""
    from worker import hardware

    settings = settings_for(tmp_path)
    del settings["EMBEDQ_PROVIDERS"]  # the default: what a new user gets
    settings["EMBEDQ_MODEL_DIR"] = str(minilm.parent)
    result = embedq("embed", "one text", "--model", minilm.name, env=settings)
    assert result.code == 0, result.stderr
    assert "[E:onnxruntime" not in result.stderr
    assert "Failed to load library" not in result.stderr
    said = result.stderr.count("no NVIDIA device on this machine")
    assert said == (0 if hardware.has_nvidia_device() else 1)
