"""``pip install embedq`` is the client side; the runtime is the ``worker`` extra. The command
line names that extra for exactly the packages pyproject puts in it, and a command that needs
them on a client install ends with that line and exit 2, never an ImportError traceback. A
client install is simulated by hiding the extra's modules (``sys.modules[name] = None``) in a
process of its own (tests/integration/test_client_side.py); tests/acceptance/test_client_install.py
builds a real one. Here: the names, read without starting anything."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tasks.cli.failures import Code, command_path, ending
from worker.extra import EXTRA as WORKER_EXTRA
from worker.extra import RUNTIME

REPO = Path(__file__).resolve().parents[2]


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
