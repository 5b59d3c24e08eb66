"""The layout rules, read from the source with ``ast`` (nothing is imported):

- imports flow one way between the packages: ``tasks`` -> ``worker``, ``storage``;
  ``worker`` -> ``storage``; ``storage`` -> nothing of ours;
- inside ``tasks``, its wings depend one way too (``WINGS``): the root (the wire, the queue's
  two ends and the two Celery tasks) depends on no wing; ``fleet`` and ``backfill`` on the root;
  ``openai_batch`` on those and ``backfill``; the faces last, ``api`` and then ``cli``;
- no module imports a Celery task module (``tasks.embed``, ``tasks.download``): the Celery app
  lists them by name, so neither the producer nor the CLI loads a task;
- the producer's side of the root imports the worker's side (which loads the engine) only
  inside a function, never when it is imported: a client install imports the producer;
- no import cycle between the project's modules, whether the import sits at the top of a module
  or inside a function (a function-level import hides a cycle; it does not remove it);
- the store's queries live in ``storage``: no ``select(``/``update(``/``insert(``/``delete(``/
  ``text(`` and no ``session.execute`` in ``tasks``;
- no module in ``tasks`` over 350 lines.

Each rule is shown to fail on a planted case, so none can pass for nothing.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("storage", "worker", "tasks")
ALLOWED = {"storage": set(), "worker": {"storage"}, "tasks": {"worker", "storage"}}
WINGS = {
    "root": set(),
    "fleet": {"root"},
    "backfill": {"root"},
    "openai_batch": {"root", "backfill"},
    "api": {"root", "backfill", "openai_batch"},
    "cli": {"root", "fleet", "backfill", "openai_batch", "api"},
}
"""The wings of ``tasks`` (its subpackages; the modules directly in it are the root) and the
wings each may import besides its own."""
TASK_MODULES = {"tasks.embed", "tasks.download"}
PRODUCER_SIDE = {
    "tasks.names",
    "tasks.message",
    "tasks.publishing",
    "tasks.producer",
    "tasks.completion",
    "tasks.model_options",
    "tasks.vector_files",
}
WORKER_SIDE = {"tasks.batches", "tasks.local", "tasks.runtime", "tasks.preparation", *TASK_MODULES}
QUERY_BUILDERS = {"select", "update", "insert", "delete", "text", "union", "exists"}
MAX_LINES = 350


@functools.cache
def _parsed(path: Path) -> ast.Module:
    """A module's syntax tree, parsed once per run (the rules walk every module several
    times)."""
    return ast.parse(path.read_text(), str(path))


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    """The project module an imported dotted name lands in (``worker.engine.Engine`` ->
    ``worker.engine``), or None when it is not ours."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _typing_only(tree: ast.AST) -> set[int]:
    """The ids of the nodes under ``if TYPE_CHECKING:``: imports for the type checker, which
    never run."""
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            hidden |= {id(inner) for child in node.body for inner in ast.walk(child)}
    return hidden


def _imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported project module, line) for every import that runs, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = _parsed(path)
    typing_only = _typing_only(tree)
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _target(alias.name)) is not None:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # ``from tasks import names`` imports the module tasks.names
                target = _target(f"{base}.{alias.name}") or _target(base)
                if target is not None:
                    yield target, node.lineno


def _graph() -> dict[str, set[str]]:
    return {
        module: {target for target, _ in _imports(module, path) if target != module}
        for module, path in MODULES.items()
    }


def test_the_walker_sees_the_imports_it_must_judge() -> None:
    graph = _graph()
    # Known edges, at module and at function level: if the walker missed them, the rules
    # below would pass for nothing.
    assert "storage.session" in graph["tasks.producer"]
    assert "worker.settings" in graph["tasks.producer"]
    assert "worker.engine" in graph["worker.lifecycle"]  # inside a function
    assert "worker.app" not in graph["storage.session"]
    assert len(MODULES) > 40


def _against_the_flow(module: str, path: Path) -> list[str]:
    package = module.split(".")[0]
    return [
        f"{path.name}:{line} imports {target}"
        for target, line in _imports(module, path)
        if target.split(".")[0] not in ALLOWED[package] | {package}
    ]


def test_the_flow_check_finds_an_import_against_it(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from typing import TYPE_CHECKING\n"
        "from storage import models\n"
        "if TYPE_CHECKING:\n"
        "    from tasks import producer\n"
        "def f():\n"
        "    from worker.settings import get_settings\n"
    )
    assert _against_the_flow("storage.planted", planted) == ["planted.py:6 imports worker.settings"]


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_flow_one_way_between_the_packages(package: str) -> None:
    wrong = [
        hit
        for module, path in MODULES.items()
        if module.split(".")[0] == package
        for hit in _against_the_flow(module, path)
    ]
    assert wrong == []


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each import cycle a depth-first walk meets, as "a -> b -> a"."""
    cycles: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            # A package's __init__ importing its own submodules is how packages are built,
            # and a submodule importing its package's __init__ is not a cycle of modules.
            if module == target.rpartition(".")[0] or target == module.rpartition(".")[0]:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_the_cycle_check_finds_a_cycle_through_several_modules() -> None:
    graph = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x", "b"}, "b": set(), "a": {"a.x"}}
    assert _cycles(graph) == ["a.x -> a.y -> a.z -> a.x"]


def test_no_import_cycle_between_project_modules() -> None:
    assert _cycles(_graph()) == []


def _sql_in(path: Path) -> Iterator[str]:
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    tree = _parsed(path)
    builders: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
            builders |= {a.asname or a.name for a in node.names if a.name in QUERY_BUILDERS}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in builders:
            yield f"{where}:{node.lineno} {func.id}(...)"
        elif isinstance(func, ast.Attribute):
            receiver = ast.unparse(func.value)
            if func.attr in QUERY_BUILDERS and receiver in {"sqlalchemy", "sa"}:
                yield f"{where}:{node.lineno} {receiver}.{func.attr}(...)"
            if func.attr in {"execute", "scalars", "scalar", "query"} and any(
                word in receiver.lower() for word in ("session", "connection", "conn")
            ):
                yield f"{where}:{node.lineno} {receiver}.{func.attr}(...)"


def test_the_sql_check_finds_a_query_when_there_is_one(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from sqlalchemy import select as pick\n"
        "def f(session, model, bar):\n"
        "    bar.update(1)\n"
        "    session.execute(pick(model))\n"
    )
    assert sorted(_sql_in(probe)) == ["probe.py:4 pick(...)", "probe.py:4 session.execute(...)"]


def test_tasks_hold_no_sql() -> None:
    found = [
        hit
        for module, path in MODULES.items()
        if module.startswith("tasks")
        for hit in _sql_in(path)
    ]
    assert found == []


def test_no_module_in_tasks_is_over_350_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for module, path in MODULES.items()
        if module.startswith("tasks") and (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


# --- inside tasks --------------------------------------------------------------------------------
def wing(module: str) -> str:
    """The wing of a ``tasks`` module: its subpackage, or ``root``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in WINGS) else "root"


def _across_wings(module: str, path: Path) -> list[str]:
    own = wing(module)
    return [
        f"{path.name}:{line} ({own}) imports {target} ({wing(target)})"
        for target, line in _imports(module, path)
        if target.startswith("tasks.") and wing(target) not in WINGS[own] | {own}
    ]


def test_the_wing_check_finds_an_import_against_the_flow(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("from tasks.cli import present\nfrom tasks import names\n")
    assert wing("tasks.producer") == "root" and wing("tasks.fleet") == "fleet"
    assert wing("tasks.api.embeddings") == "api" and wing("tasks.cli") == "cli"
    assert _across_wings("tasks.api.planted", planted) == [
        "planted.py:1 (api) imports tasks.cli.present (cli)"
    ]
    assert _across_wings("tasks.planted", planted) == [
        "planted.py:1 (root) imports tasks.cli.present (cli)"
    ]


def test_the_wings_of_tasks_depend_one_way() -> None:
    wrong = [
        hit
        for module, path in MODULES.items()
        if module.startswith("tasks.")
        for hit in _across_wings(module, path)
    ]
    assert wrong == []


def _task_module_imports(module: str, path: Path) -> list[str]:
    return [
        f"{path.name}:{line} imports the task module {target}"
        for target, line in _imports(module, path)
        if target in TASK_MODULES and target != module
    ]


def test_the_task_module_check_finds_an_import_of_a_task(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from tasks.download import download\n")
    assert _task_module_imports("tasks.producer", planted) == [
        "planted.py:2 imports the task module tasks.download"
    ]


def test_no_module_imports_a_celery_task_module() -> None:
    wrong = [hit for module, path in MODULES.items() for hit in _task_module_imports(module, path)]
    assert wrong == []


def _module_level(path: Path) -> Iterator[ast.stmt]:
    """The statements that run when a module is imported: its body, through ``if``/``try``
    blocks (not ``TYPE_CHECKING``), never inside a function or class body."""
    pending = list(_parsed(path).body)
    while pending:
        node = pending.pop(0)
        yield node
        if isinstance(node, ast.If) and not ast.unparse(node.test).endswith("TYPE_CHECKING"):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody
            pending += [stmt for handler in node.handlers for stmt in handler.body]


def _eager_worker_side(module: str, path: Path) -> list[str]:
    """Imports of the worker's side that run when ``module`` is imported."""
    found: list[str] = []
    for node in _module_level(path):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        hits = {target for name in names if (target := _target(name)) in WORKER_SIDE}
        found += [f"{path.name}:{node.lineno} imports {target}" for target in sorted(hits)]
    return found


def test_the_eager_import_check_tells_a_top_level_import_from_a_function_level_one(
    tmp_path: Path,
) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from typing import TYPE_CHECKING\n"
        "from tasks import batches\n"
        "if TYPE_CHECKING:\n"
        "    from tasks.runtime import Runtime\n"
        "def f():\n"
        "    from tasks.local import LocalPublisher\n"
    )
    assert _eager_worker_side("tasks.producer", planted) == ["planted.py:2 imports tasks.batches"]


def test_the_producer_side_loads_the_worker_side_only_when_it_runs_a_batch_here() -> None:
    assert set(MODULES) >= PRODUCER_SIDE and set(MODULES) >= WORKER_SIDE
    wrong = [
        hit
        for module in sorted(PRODUCER_SIDE)
        for hit in _eager_worker_side(module, MODULES[module])
    ]
    assert wrong == []
