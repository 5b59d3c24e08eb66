"""The ``worker`` extra: what ``pip install 'embedq[worker]'`` adds to the client install.

``pip install embedq`` is the client side (submit jobs, read them back, call the API); running a
model, preparing one, or starting a worker or Flower needs the extra. This module names its
packages by import name and checks for them without importing any, so a client install can say
which extra to add instead of failing with a traceback.
"""

from __future__ import annotations

import importlib.util

EXTRA = frozenset(
    {"onnxruntime", "tokenizers", "huggingface_hub", "filelock", "prometheus_client", "flower"}
)
"""The extra's packages (pyproject.toml's ``worker``; a unit test keeps the two equal)."""

RUNTIME = ("onnxruntime", "tokenizers", "filelock", "prometheus_client")
"""What a process that runs batches imports from the extra (the engine, the model store's lock,
the metrics)."""

INSTALL = "pip install 'embedq[worker]'"


def missing(*modules: str) -> str | None:
    """The first of ``modules`` not installed here (none of them is imported), or ``None``."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return module
    return None


def require(*modules: str) -> None:
    """Raise ``ModuleNotFoundError`` for the first of ``modules`` not installed here."""
    absent = missing(*modules)
    if absent is not None:
        raise ModuleNotFoundError(f"No module named {absent!r}", name=absent)
