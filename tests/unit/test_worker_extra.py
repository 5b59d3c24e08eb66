"""``pip install embedq`` is the client side; the runtime is the ``worker`` extra. The command
line names that extra for exactly the packages pyproject puts in it, and a command that needs
them on a client install ends with that line and exit 2, never an ImportError traceback. A
client install is simulated here by hiding the extra's modules (``sys.modules[name] = None``);
tests/acceptance/test_client_install.py builds a real one."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tasks.cli.failures import Code, command_path, ending
from worker.extra import EXTRA as WORKER_EXTRA
from worker.extra import RUNTIME

REPO = Path(__file__).resolve().parents[2]
HIDE_EXTRA = f"import sys; sys.modules.update(dict.fromkeys({sorted(WORKER_EXTRA)!r}))"


def extras() -> dict[str, list[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {"": project["dependencies"], **project["optional-dependencies"]}


def test_the_extra_the_command_line_names_is_the_one_pyproject_declares() -> None:
    provides: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            provides.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    modules: set[str] = set()
    for line in extras()["worker"]:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate():
            modules |= provides[requirement.name.lower().replace("_", "-")]
    assert modules == WORKER_EXTRA
    assert set(RUNTIME) <= WORKER_EXTRA


def test_the_base_install_names_no_runtime_and_dev_has_the_worker_extra() -> None:
    declared = extras()
    names = {Requirement(line).name.lower() for line in declared[""]}
    assert not names & {"onnxruntime", "onnxruntime-gpu", "tokenizers", "huggingface-hub"}
    assert "worker" in Requirement(declared["dev"][0]).extras


@pytest.mark.parametrize(
    ("argv", "path"),
    [
        (["worker", "-Q", "bulk"], "embedq worker"),
        (["-v", "models", "pull", "hf://a/b", "--name", "b"], "embedq models pull"),
        (["encode", "--model", "m", "-f", "x.jsonl"], "embedq encode"),
        ([], "embedq"),
    ],
)
def test_the_command_is_named_as_typed(argv: list[str], path: str) -> None:
    assert command_path(argv, {"models", "db"}) == path


def test_a_missing_runtime_module_is_the_extra_to_install_and_any_other_is_a_bug() -> None:
    line, code = ending(ModuleNotFoundError("No module named 'tokenizers'", name="tokenizers"))
    assert code == Code.INPUT
    assert line == (
        "this command needs the worker extra (tokenizers is not installed):"
        " pip install 'embedq[worker]'"
    )
    assert ending(ModuleNotFoundError("x", name="yaml"))[1] == Code.BUG


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
