"""A prepared model loads only while its files are the ones its manifest describes: the ONNX
file, the tokenizer and the sentence-transformers configs.

Each test copies the exported reference model into its own store and damages the copy as a bad
disk, an interrupted copy or a hand edit would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cli import Cli
from tests.damage import overwrite_middle, shuffle_vocabulary
from worker import sources
from worker.engine import Engine
from worker.errors import ModelCorruptError
from worker.manifest import Manifest
from worker.model_store import ModelStore, PullOptions
from worker.settings import Settings

pytestmark = pytest.mark.model

PROBES = ["A short sentence.", "Embeddings map text to vectors."]


@pytest.fixture
def copy(minilm: Path, tmp_path: Path) -> Path:
    """The reference model, copied with its manifest into a fresh store."""
    return Path(shutil.copytree(minilm, tmp_path / "store" / "minilm"))


def test_an_unchanged_copy_loads_and_embeds_as_the_original(
    copy: Path, engine: Engine, cpu_settings: Settings
) -> None:
    loaded = Engine.load(copy, cpu_settings)
    np.testing.assert_array_equal(loaded.encode(PROBES).vectors, engine.encode(PROBES).vectors)


def test_a_model_damaged_in_the_middle_is_refused_with_how_to_fix_it(
    copy: Path, cpu_settings: Settings
) -> None:
    manifest = Manifest.read(copy)
    onnx = copy / "model.onnx"
    size = onnx.stat().st_size
    overwrite_middle(onnx)
    damaged = sources.sha256_of(onnx)
    assert onnx.stat().st_size == size

    with pytest.raises(ModelCorruptError) as caught:
        Engine.load(copy, cpu_settings)
    message = str(caught.value)
    assert "model.onnx does not match its manifest" in message
    assert f"its sha256 is {damaged[:12]}..." in message
    assert f"the manifest says {manifest.onnx_sha256[:12]}..." in message
    assert f"pull the model again: embedq models pull {manifest.source} --name minilm" in message


def test_damage_that_keeps_the_size_and_modification_time_is_still_caught(
    copy: Path, cpu_settings: Settings
) -> None:
    # The file is hashed on every load, with no cache keyed on (size, mtime, inode): such a key
    # could not see this edit, nor a bit flipped on disk, which changes none of them.
    onnx = copy / "model.onnx"
    before = onnx.stat()
    overwrite_middle(onnx, size=1)
    os.utime(onnx, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = onnx.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    with pytest.raises(ModelCorruptError, match="does not match its manifest"):
        Engine.load(copy, cpu_settings)


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json", "1_Pooling/config.json"])
def test_a_model_folder_without_one_of_its_files_is_refused(
    copy: Path, cpu_settings: Settings, name: str
) -> None:
    (copy / name).unlink()
    with pytest.raises(ModelCorruptError) as caught:
        Engine.load(copy, cpu_settings)
    assert f"{copy / name} is missing" in str(caught.value)
    assert "pull the model again: embedq models pull" in str(caught.value)


def test_the_fix_the_message_gives_repairs_the_model(copy: Path, cpu_settings: Settings) -> None:
    overwrite_middle(copy / "model.onnx")
    with pytest.raises(ModelCorruptError):
        Engine.load(copy, cpu_settings)
    source = Manifest.read(copy).source  # `embedq models pull SOURCE --name minilm` does this:
    ModelStore(copy.parent).pull(source, "minilm", PullOptions(), cpu_settings)
    assert Engine.load(copy, cpu_settings).dim == 384


@pytest.mark.parametrize(
    "damage",
    [
        ("tokenizer.json", shuffle_vocabulary),
        ("1_Pooling/config.json", lambda p: p.write_text(p.read_text().replace("true", "false"))),
        ("sentence_bert_config.json", lambda p: p.write_text('{"max_seq_length": 8}')),
    ],
    ids=["tokenizer-vocabulary-shuffled", "pooling-config-edited", "length-config-edited"],
)
def test_a_damaged_tokenizer_or_config_is_refused_like_a_damaged_model_file(
    copy: Path, cpu_settings: Settings, damage: tuple[str, Any]
) -> None:
    name, change = damage
    assert name in Manifest.read(copy).files  # recorded when the model was prepared
    change(copy / name)
    with pytest.raises(ModelCorruptError) as caught:
        Engine.load(copy, cpu_settings)
    assert f"{copy / name} does not match its manifest" in str(caught.value)
    assert "embedq models pull" in str(caught.value)


def write_old_manifest(folder: Path) -> None:
    """Rewrite ``folder``'s manifest as embedq wrote it before it recorded the other files."""
    data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    del data["files"]
    (folder / "manifest.json").write_text(json.dumps(data, indent=2), encoding="utf-8")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))


def test_a_shuffled_vocabulary_that_nothing_checks_gives_wrong_vectors(
    copy: Path, engine: Engine, cpu_settings: Settings
) -> None:
    """Why the tokenizer is hashed: under a manifest that does not record it, the damage of
    the test above loads without a word and the vectors are far from the right ones."""
    write_old_manifest(copy)
    shuffle_vocabulary(copy / "tokenizer.json")
    wrong = Engine.load(copy, cpu_settings).encode(PROBES).vectors
    assert cosines(wrong, engine.encode(PROBES).vectors).max() < 0.5


def test_a_model_prepared_before_the_files_were_hashed_is_rehashed_then_checked(
    copy: Path,
    engine: Engine,
    cpu_settings: Settings,
    caplog: pytest.LogCaptureFixture,
    cli: Cli,
) -> None:
    write_old_manifest(copy)
    assert Manifest.read(copy).files == {}  # an old manifest still reads
    with caplog.at_level(logging.WARNING, logger="worker.manifest"):
        Engine.load(copy, cpu_settings)  # loads, and says once what it cannot check
    warnings = [r.getMessage() for r in caplog.records if r.name == "worker.manifest"]
    assert len(warnings) == 1 and "run `embedq models rehash minilm`" in warnings[0]

    result = cli("models", "rehash", "minilm", env={"EMBEDQ_MODEL_DIR": str(copy.parent)})
    assert result.code == 0, result.stderr
    recorded = Manifest.read(copy).files
    assert f"{len(recorded)} files recorded beside it as they are now" in result.stdout
    assert {"tokenizer.json", "1_Pooling/config.json", "sentence_bert_config.json"} <= set(recorded)
    loaded = Engine.load(copy, cpu_settings)
    np.testing.assert_array_equal(loaded.encode(PROBES).vectors, engine.encode(PROBES).vectors)
    shuffle_vocabulary(copy / "tokenizer.json")
    with pytest.raises(ModelCorruptError, match=r"tokenizer\.json does not match its manifest"):
        Engine.load(copy, cpu_settings)


def test_rehash_refuses_a_file_changed_since_its_hash_was_recorded(copy: Path, cli: Cli) -> None:
    before = Manifest.read(copy)
    env = {"EMBEDQ_MODEL_DIR": str(copy.parent)}
    checked = cli("models", "rehash", "minilm", env=env)
    assert checked.code == 0, checked.stderr
    assert f"its {len(before.files)} recorded files and model.onnx all match" in checked.stdout
    shuffle_vocabulary(copy / "tokenizer.json")
    refused = cli("models", "rehash", "minilm", env=env)
    assert refused.code == 2
    assert f"{copy / 'tokenizer.json'} does not match its manifest" in refused.stderr
    assert Manifest.read(copy) == before  # the damaged file was not recorded


def test_a_staging_folder_left_by_a_killed_preparation_is_removed_by_the_next(
    minilm: Path, tmp_path: Path, cpu_settings: Settings
) -> None:
    store = ModelStore(tmp_path / "store")
    left = tmp_path / "store" / ".staging-copied-0123abcd"
    other = tmp_path / "store" / ".staging-copied-two-89abcdef"  # another model's: kept
    for folder in (left, other):
        (folder / "model").mkdir(parents=True)
        (folder / "download-part.tar.gz").write_bytes(b"x" * 1024)
    store.pull(str(minilm), "copied", PullOptions(), cpu_settings)
    assert not left.exists() and other.exists()
    assert (tmp_path / "store" / "copied" / "manifest.json").is_file()
