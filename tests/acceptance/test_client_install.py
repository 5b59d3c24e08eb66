"""An application installs embedq without extras (``pip install embedq``, the client side) and
submits jobs through it to a worker installed with the ``worker`` extra. The client venv holds
this checkout's source and what pip resolves for it (``client``); it must hold no onnxruntime,
tokenizers or huggingface_hub, and the vectors it reads back must be the engine's."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from tests import exported
from tests.acceptance.conftest import Fleet
from tests.conftest import cosines, require
from worker.engine import Engine

REPO = Path(__file__).resolve().parents[2]
SOURCE = ("pyproject.toml", "README.md", "worker", "tasks", "storage", "migrations")
RUNTIME = ("onnxruntime", "tokenizers", "huggingface_hub", "torch", "transformers")
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Celery workers embed batches of texts with a warm ONNX Runtime session.",
    "An application that only submits jobs needs neither onnxruntime nor tokenizers.",
    "short",
    " ".join(["a longer text that the tokenizer truncates at the model's length"] * 40),
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
]

SUBMIT = """
import json, sys
import numpy as np
from tasks import producer

texts = json.loads(sys.argv[1])
job = producer.submit(texts, model="minilm", ids=[f"t{i}" for i in range(len(texts))])
status = job.wait(timeout=300)
ids, vectors = job.embeddings()
np.save(sys.argv[2], vectors)
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in json.loads(sys.argv[3]))
print(json.dumps({"job": job.id, "status": status, "ids": ids, "producer": producer.__file__,
                  "loaded": loaded}))
"""


def client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without anything that would reach this checkout's source."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH",)}
    return {**env, **(extra or {})}


def in_client(
    command: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a program of the client venv in ``cwd`` (never the checkout, whose ``tasks`` would
    shadow the installed one), with ``env`` added."""
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env=client_env(env), timeout=400
    )


def _dependencies_key() -> str:
    """What decides the client venv's third-party packages: the base dependencies in
    pyproject.toml and this Python."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    what = json.dumps([project["dependencies"], sys.version_info[:2]], sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv with ``pip install <this source>`` and no extras; its python.

    The venv is made once per machine and per set of base dependencies (its third-party
    packages are what pip resolves from pyproject.toml, the same for the same dependencies) in
    the tests' cache folder; each session installs this checkout's source into it again with
    ``--no-deps``. A change of dependencies (or Python) makes a fresh venv from scratch."""
    root = tmp_path_factory.mktemp("client")
    source = root / "src"  # a copy: building in the checkout would write build/ into it
    for name in SOURCE:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    cache = exported.cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    venv = cache / f"client-venv-{_dependencies_key()}"
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    with FileLock(str(venv) + ".lock"):
        if not (venv / "ready").is_file():  # a fresh venv, its dependencies resolved by pip
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            command = [*pip, str(source)]
        else:  # the same dependencies: this checkout's code replaces the last one's
            command = [*pip, "--no-deps", "--force-reinstall", str(source)]
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=root, env=client_env(), timeout=900
        )
        require(
            done.returncode == 0, f"pip install of the client side failed:\n{done.stderr[-3000:]}"
        )
        (venv / "ready").touch()
        yield python


def site_packages(python: Path) -> Path:
    found = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(found.stdout.strip())


def megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def test_the_client_install_has_no_inference_runtime(client: Path) -> None:
    look = (
        "import importlib.util as u, json;"
        f" print(json.dumps([m for m in {RUNTIME!r} if u.find_spec(m)]))"
    )
    found = in_client([str(client), "-c", look], client.parent)
    assert found.returncode == 0 and json.loads(found.stdout) == [], found.stderr
    client_mb = megabytes(site_packages(client))
    full_mb = megabytes(site_packages(Path(sys.executable)))
    print(f"client install: {client_mb:.0f} MB of site-packages (this dev venv: {full_mb:.0f} MB)")


def test_a_job_submitted_from_the_client_install_comes_back_with_the_engines_vectors(
    client: Path, fleet: Fleet, engine: Engine, tmp_path: Path
) -> None:
    env = fleet.env
    out = tmp_path / "vectors.npy"
    submit = [str(client), "-c", SUBMIT, json.dumps(TEXTS), str(out), json.dumps(RUNTIME)]
    done = in_client(submit, tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["status"]["state"] == "succeeded", (result, fleet.worker.tail(30))
    assert (result["status"]["done"], result["status"]["failed"]) == (len(TEXTS), 0)
    assert result["ids"] == [f"t{i}" for i in range(len(TEXTS))]
    assert Path(result["producer"]).is_relative_to(client.parents[1])
    assert result["loaded"] == []
    vectors = np.load(out)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    assert float(np.min(cosines(vectors, engine.encode(TEXTS).vectors))) >= 0.9999

    embedq = str(client.parent / "embedq")
    shown = in_client([embedq, "job", result["job"]], tmp_path, env)
    assert shown.returncode == 0 and "succeeded" in shown.stdout, shown.stderr
    refused = in_client([embedq, "worker"], tmp_path, env)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: embedq worker needs the worker extra (onnxruntime is not installed):"
        " pip install 'embedq[worker]'"
    )
