from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker.errors import ModelError, ModelNotFoundError
from worker.manifest import Behaviour, Manifest, Pooling, Precision
from worker.model_store import ModelStore


def manifest(name: str = "m") -> Manifest:
    return Manifest(
        name=name,
        source="hf://org/model@abc",
        revision="abc",
        onnx_sha256="0" * 64,
        dim=384,
        behaviour=Behaviour(max_seq_length=256, pooling=Pooling.MEAN, normalize=True),
        precision=Precision.INT8,
        inputs=("input_ids", "attention_mask"),
        output="last_hidden_state",
        created_at=datetime(2026, 11, 26, tzinfo=UTC),
        created_by="downloaded",
        steps=("quantized:int8",),
        validation={"int8_vs_fp32_min_cosine": 0.98},
    )


def test_a_manifest_survives_a_round_trip(tmp_path: Path) -> None:
    manifest().write(tmp_path)
    assert Manifest.read(tmp_path) == manifest()


def test_a_folder_without_a_manifest_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a prepared model"):
        Manifest.read(tmp_path)


def test_a_damaged_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"name": "m", "dim": -1}')
    with pytest.raises(ModelError, match="not a valid manifest"):
        Manifest.read(tmp_path)


def test_the_store_lists_only_finished_models(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        manifest(name).write(tmp_path / name)
    (tmp_path / ".staging-c-1234").mkdir()  # an interrupted prepare
    manifest("c").write(tmp_path / ".staging-c-1234")
    (tmp_path / "half").mkdir()  # a folder without a manifest
    assert [m.name for m in store.list()] == ["a", "b"]
    with pytest.raises(ModelNotFoundError, match="embedq models pull SOURCE --name half"):
        store.get("half")


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "a\\b"])
def test_unusable_model_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelError, match="not a usable model name"):
        ModelStore(tmp_path).path(name)
