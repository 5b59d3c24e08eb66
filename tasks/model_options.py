"""The options a model is prepared with (those of ``embedq models pull``), as the catalog stores
them and as the model store takes them. Light: the producer (``register_model``) and the CLI
check options without importing a Celery task module or onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.errors import InputError
from worker.manifest import Pooling, Precision

if TYPE_CHECKING:
    from worker.model_store import PullOptions

OPTIONS = ("precision", "sha256", "max_seq_length", "pooling", "normalize")


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Catalog options, checked: the names and values ``embedq models pull`` accepts."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise InputError(f"unknown model options {sorted(unknown)}; known: {list(OPTIONS)}")
    try:
        if options.get("precision") is not None:
            Precision(options["precision"])
        if options.get("pooling") is not None:
            Pooling(options["pooling"])
    except ValueError as exc:
        raise InputError(f"bad model option: {exc}") from exc
    return {key: value for key, value in options.items() if value is not None}


def pull_options(options: dict[str, Any]) -> PullOptions:
    """Catalog options as the model store's ``PullOptions``."""
    from worker.model_store import PullOptions  # onnxruntime: not for a producer

    values = check_options(options)
    if "precision" in values:
        values["precision"] = Precision(values["precision"])
    if "pooling" in values:
        values["pooling"] = Pooling(values["pooling"])
    return PullOptions(**values)
