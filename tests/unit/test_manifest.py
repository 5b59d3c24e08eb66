import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker.errors import ModelCorruptError, ModelError, ModelNotFoundError
from worker.manifest import Behaviour, Manifest, Pooling, Precision, hash_files, rehash, verify
from worker.model_store import ModelStore
from worker.sources import sha256_of


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


def prepared(folder: Path) -> Manifest:
    """A small model folder as a preparation leaves it (an ONNX file with external data, the
    tokenizer, a pooling config in its sub-folder), with a manifest recording their hashes."""
    folder.mkdir(exist_ok=True)
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "model.onnx_data").write_bytes(b"weights")
    (folder / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0, "b": 1}}}')
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    recorded = manifest().model_copy(
        update={"onnx_sha256": sha256_of(folder / "model.onnx"), "files": hash_files(folder)}
    )
    recorded.write(folder)
    return recorded


def test_every_file_but_the_manifest_and_the_onnx_file_is_recorded(tmp_path: Path) -> None:
    recorded = prepared(tmp_path)
    assert sorted(recorded.files) == ["1_Pooling/config.json", "model.onnx_data", "tokenizer.json"]
    assert recorded.files["tokenizer.json"] == sha256_of(tmp_path / "tokenizer.json")


def test_an_intact_folder_passes(tmp_path: Path) -> None:
    verify(tmp_path, prepared(tmp_path))


@pytest.mark.parametrize("name", ["tokenizer.json", "1_Pooling/config.json", "model.onnx_data"])
def test_a_changed_file_is_refused_with_its_name_and_the_fix(tmp_path: Path, name: str) -> None:
    recorded = prepared(tmp_path)
    path = tmp_path / name
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # one bit flipped, as on a bad disk
    with pytest.raises(ModelCorruptError) as caught:
        verify(tmp_path, recorded)
    assert f"{path} does not match its manifest" in str(caught.value)
    assert f"the manifest says {recorded.files[name][:12]}..." in str(caught.value)
    assert "embedq models pull hf://org/model@abc --name m" in str(caught.value)


def test_a_missing_file_is_refused_with_its_name(tmp_path: Path) -> None:
    recorded = prepared(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").unlink()
    with pytest.raises(ModelCorruptError, match=r"1_Pooling/config\.json is missing.*pull"):
        verify(tmp_path, recorded)


def old_manifest(folder: Path) -> None:
    """Write ``folder``'s manifest as embedq did before it recorded the other files."""
    data = json.loads((folder / "manifest.json").read_text())
    del data["files"]
    (folder / "manifest.json").write_text(json.dumps(data))


def test_a_manifest_from_before_the_files_were_recorded_reads_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prepared(tmp_path)
    old_manifest(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # not recorded, so not checked
    old = Manifest.read(tmp_path)
    assert old.files == {}
    with caplog.at_level(logging.WARNING, logger="worker.manifest"):
        verify(tmp_path, old)
    assert [r.getMessage() for r in caplog.records] == [
        "model m: its manifest records no hash of its tokenizer and configs, so they are not"
        " checked: run `embedq models rehash m` to record them"
    ]
    (tmp_path / "model.onnx").write_bytes(b"other")  # its ONNX file still is
    with pytest.raises(ModelCorruptError, match=r"model\.onnx does not match"):
        verify(tmp_path, old)


def test_rehash_records_the_files_and_a_later_change_is_refused(tmp_path: Path) -> None:
    recorded = prepared(tmp_path)
    old_manifest(tmp_path)
    assert rehash(tmp_path) == recorded
    assert Manifest.read(tmp_path) == recorded
    (tmp_path / "tokenizer.json").write_text('{"model": {"vocab": {"a": 1, "b": 0}}}')
    with pytest.raises(ModelCorruptError, match=r"tokenizer\.json does not match"):
        verify(tmp_path, Manifest.read(tmp_path))


def test_rehash_refuses_an_onnx_file_that_does_not_match_and_records_nothing(
    tmp_path: Path,
) -> None:
    prepared(tmp_path)
    old_manifest(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"other")
    with pytest.raises(ModelCorruptError, match=r"model\.onnx does not match"):
        rehash(tmp_path)
    assert Manifest.read(tmp_path).files == {}


def test_rehash_never_records_a_file_changed_since_its_hash_was_recorded(tmp_path: Path) -> None:
    recorded = prepared(tmp_path)
    assert rehash(tmp_path) == recorded  # recorded already: checked, left as it is
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    with pytest.raises(ModelCorruptError, match=r"1_Pooling/config\.json does not match"):
        rehash(tmp_path)
    assert Manifest.read(tmp_path) == recorded
