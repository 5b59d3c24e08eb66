"""Reading a model's behaviour from its sentence-transformers files.

sentence-transformers runs a model as its files say: truncation at ``max_seq_length`` from
sentence_bert_config.json, pooling from ``1_Pooling/config.json`` (the folder named in
modules.json), normalisation when modules.json lists a Normalize module. A checkpoint's
tokenizer.json often carries truncation and padding of its own (all-MiniLM-L6-v2's says 128);
those are the tokenizer's training leftovers, not the model's, and are ignored.

An explicit override wins; a model that says nothing and has no override is refused with an
error that names the option to pass, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.errors import ModelConfigError
from worker.manifest import Behaviour, Pooling

# sentence-transformers' Pooling config keys, in the order it checks them.
_POOLING_KEYS = {
    "pooling_mode_cls_token": Pooling.CLS,
    "pooling_mode_mean_tokens": Pooling.MEAN,
    "pooling_mode_max_tokens": Pooling.MAX,
    "pooling_mode_mean_sqrt_len_tokens": Pooling.MEAN_SQRT_LEN,
    "pooling_mode_lasttoken": Pooling.LAST_TOKEN,
}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ModelConfigError(f"{path} is not valid JSON: {exc}") from exc


def _modules(folder: Path) -> list[dict[str, Any]]:
    modules = read_json(folder / "modules.json")
    return modules if isinstance(modules, list) else []


def _pooling_from_files(folder: Path) -> Pooling | None:
    for module in _modules(folder):
        if str(module.get("type", "")).endswith("Pooling"):
            config = read_json(folder / str(module.get("path", "")) / "config.json")
            if not isinstance(config, dict):
                return None
            chosen = [mode for key, mode in _POOLING_KEYS.items() if config.get(key)]
            if len(chosen) > 1:
                raise ModelConfigError(
                    f"{folder} combines pooling modes {[str(m) for m in chosen]}; embedq runs one"
                    " mode: pass --pooling to choose"
                )
            return chosen[0] if chosen else None
    return None


def _normalize_from_files(folder: Path) -> bool | None:
    modules = _modules(folder)
    if not modules:
        return None
    return any(str(m.get("type", "")).endswith("Normalize") for m in modules)


def _max_length_from_files(folder: Path) -> int | None:
    config = read_json(folder / "sentence_bert_config.json")
    if isinstance(config, dict) and isinstance(config.get("max_seq_length"), int):
        return int(config["max_seq_length"])
    return None


def resolve_behaviour(
    folder: Path,
    *,
    max_seq_length: int | None = None,
    pooling: Pooling | None = None,
    normalize: bool | None = None,
) -> Behaviour:
    """The behaviour of the model in ``folder``: explicit values first, then its own files."""
    pooling = pooling if pooling is not None else _pooling_from_files(folder)
    if pooling is None:
        raise ModelConfigError(
            f"{folder} does not say how to pool (no Pooling module in modules.json):"
            " pass --pooling cls|mean|max|mean_sqrt_len|lasttoken|none"
        )
    normalize = normalize if normalize is not None else _normalize_from_files(folder)
    if normalize is None:
        raise ModelConfigError(
            f"{folder} does not say whether to L2-normalise (no modules.json):"
            " pass --normalize or --no-normalize"
        )
    length = max_seq_length if max_seq_length is not None else _max_length_from_files(folder)
    if length is None:
        raise ModelConfigError(
            f"{folder} does not give a max_seq_length (no sentence_bert_config.json):"
            " pass --max-seq-length"
        )
    return Behaviour(max_seq_length=length, pooling=pooling, normalize=normalize)
