import json
from pathlib import Path

import pytest

from worker.errors import ModelConfigError
from worker.manifest import Pooling
from worker.model_config import resolve_behaviour


def write_st_model(
    folder: Path,
    *,
    pooling: dict[str, bool] | None,
    normalize: bool,
    max_seq_length: int | None = 256,
) -> Path:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
    ]
    if pooling is not None:
        modules.append(
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            }
        )
        (folder / "1_Pooling").mkdir(parents=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (folder / "modules.json").write_text(json.dumps(modules))
    if max_seq_length is not None:
        (folder / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length})
        )
    # A tokenizer.json with its own truncation, as all-MiniLM-L6-v2's has: not the model's.
    (folder / "tokenizer.json").write_text(json.dumps({"truncation": {"max_length": 128}}))
    return folder


def test_behaviour_comes_from_the_sentence_transformers_files(tmp_path: Path) -> None:
    folder = write_st_model(tmp_path, pooling={"pooling_mode_mean_tokens": True}, normalize=True)
    behaviour = resolve_behaviour(folder)
    assert (behaviour.max_seq_length, behaviour.pooling, behaviour.normalize) == (
        256,
        Pooling.MEAN,
        True,
    )


def test_cls_pooling_without_normalize_module(tmp_path: Path) -> None:
    folder = write_st_model(
        tmp_path,
        pooling={"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
        normalize=False,
    )
    behaviour = resolve_behaviour(folder)
    assert (behaviour.pooling, behaviour.normalize) == (Pooling.CLS, False)


def test_explicit_values_override_the_files(tmp_path: Path) -> None:
    folder = write_st_model(tmp_path, pooling={"pooling_mode_mean_tokens": True}, normalize=True)
    behaviour = resolve_behaviour(folder, max_seq_length=64, pooling=Pooling.CLS, normalize=False)
    assert (behaviour.max_seq_length, behaviour.pooling, behaviour.normalize) == (
        64,
        Pooling.CLS,
        False,
    )


def test_a_model_that_does_not_say_how_to_pool_is_refused_naming_the_option(tmp_path: Path) -> None:
    folder = write_st_model(tmp_path, pooling=None, normalize=True)
    with pytest.raises(ModelConfigError, match="--pooling"):
        resolve_behaviour(folder)


def test_a_bare_checkpoint_needs_every_choice_made_explicitly(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelConfigError, match="--pooling"):
        resolve_behaviour(tmp_path)
    with pytest.raises(ModelConfigError, match="--normalize or --no-normalize"):
        resolve_behaviour(tmp_path, pooling=Pooling.MEAN)
    with pytest.raises(ModelConfigError, match="--max-seq-length"):
        resolve_behaviour(tmp_path, pooling=Pooling.MEAN, normalize=True)
    assert resolve_behaviour(tmp_path, pooling=Pooling.MEAN, normalize=True, max_seq_length=128)


def test_combined_pooling_modes_are_refused(tmp_path: Path) -> None:
    folder = write_st_model(
        tmp_path,
        pooling={"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},
        normalize=True,
    )
    with pytest.raises(ModelConfigError, match="combines pooling modes"):
        resolve_behaviour(folder)
