"""Preparing models from every kind of source into a real model store."""

from __future__ import annotations

import functools
import http.server
import shutil
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cosines
from tests.hubserver import FakeHub, point_hub_at
from worker import model_store, sources
from worker.engine import Engine
from worker.errors import ChecksumMismatchError, ExportError, ModelError, ModelNotFoundError
from worker.manifest import Manifest, Pooling, Precision
from worker.model_store import ModelStore, PullOptions
from worker.settings import Settings

pytestmark = pytest.mark.model

PROBES = ["A short sentence.", "Embeddings map text to vectors.", "word " * 300]


def vectors(folder: Path, settings: Settings) -> np.ndarray:
    return Engine.load(folder, settings).encode(PROBES).vectors


@pytest.fixture(scope="module")
def reference(engine: Engine) -> np.ndarray:
    """The exported reference model's vectors of the probes (the session's engine on it)."""
    return engine.encode(PROBES).vectors


def onnx_folder(minilm: Path, target: Path) -> Path:
    """A plain folder with model.onnx, the tokenizer and the sentence-transformers configs."""
    shutil.copytree(minilm, target, ignore=shutil.ignore_patterns("manifest.json"))
    return target


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.fixture
def settings(store: ModelStore) -> Settings:
    return Settings(model_dir=store.root, providers=["CPUExecutionProvider"])


def archive_of(folder: Path, path: Path) -> Path:
    """``folder`` packed as ``path`` (.zip or .tar.gz) under one top folder, at the fastest
    compression level: tens of MB of ONNX take seconds at the default one, and the tests are
    about what is done with an archive, not its ratio."""
    top = "all-MiniLM-L6-v2"
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zipped:
            for file in sorted(folder.rglob("*")):
                zipped.write(file, f"{top}/{file.relative_to(folder)}")
    else:
        with tarfile.open(path, "w:gz", compresslevel=1) as tarred:
            tarred.add(folder, arcname=top)
    return path


@pytest.fixture(scope="module")
def packed(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """``packed(path)``: the exported model (without its manifest) as the archive ``path``
    (.zip or .tar.gz), a copy of one packed once per module, for the test to damage."""
    root = tmp_path_factory.mktemp("archives")
    made: dict[str, Path] = {}

    def copy(path: Path) -> Path:
        kind = ".zip" if path.name.endswith(".zip") else ".tar.gz"
        if kind not in made:
            plain = onnx_folder(minilm, root / f"plain{kind}")
            made[kind] = archive_of(plain, root / f"minilm{kind}")
            shutil.rmtree(plain)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made[kind], path)
        return path

    return copy


def leftovers(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith(".staging"))


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server for a folder: (base URL, folder)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


def test_an_exported_checkpoint_is_described_from_its_graph(minilm: Path) -> None:
    manifest = Manifest.read(minilm)
    assert manifest.dim == 384
    assert manifest.onnx_sha256 == sources.sha256_of(minilm / "model.onnx")
    assert manifest.behaviour.max_seq_length == 256
    assert (manifest.behaviour.pooling, manifest.behaviour.normalize) == ("mean", True)
    assert manifest.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert (manifest.created_by, manifest.precision) == ("exported", Precision.FP32)
    assert manifest.validation["min_cosine"] >= 0.9999
    assert manifest.validation["max_abs_diff"] <= 1e-3


def test_a_local_onnx_folder_is_copied_and_embeds_the_same(
    minilm: Path,
    tmp_path: Path,
    store: ModelStore,
    settings: Settings,
    reference: np.ndarray,
) -> None:
    source = onnx_folder(minilm, tmp_path / "plain")
    manifest = store.pull(str(source), "copied", PullOptions(), settings)
    assert manifest.created_by == "copied"
    assert manifest.onnx_sha256 == Manifest.read(minilm).onnx_sha256
    np.testing.assert_allclose(vectors(store.path("copied"), settings), reference, atol=1e-6)
    assert [m.name for m in store.list()] == ["copied"]


def test_an_archive_over_http_is_verified_then_installed(
    store: ModelStore,
    settings: Settings,
    http_folder: tuple[str, Path],
    packed: Callable[[Path], Path],
    reference: np.ndarray,
) -> None:
    base, www = http_folder
    digest = sources.sha256_of(packed(www / "minilm.tar.gz"))

    manifest = store.pull(f"{base}/minilm.tar.gz", "from-url", PullOptions(sha256=digest), settings)
    assert (manifest.created_by, manifest.revision) == ("downloaded", f"sha256:{digest}")
    np.testing.assert_allclose(vectors(store.path("from-url"), settings), reference, atol=1e-6)


def test_a_corrupted_download_is_refused_and_nothing_is_installed(
    tmp_path: Path,
    store: ModelStore,
    settings: Settings,
    packed: Callable[[Path], Path],
) -> None:
    archive_path = packed(tmp_path / "minilm.tar.gz")
    good = sources.sha256_of(archive_path)
    with archive_path.open("r+b") as handle:  # flip one byte, as a broken transfer would
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))

    with pytest.raises(ChecksumMismatchError, match=good):
        store.pull(archive_path.as_uri(), "corrupt", PullOptions(sha256=good), settings)
    assert store.list() == []
    assert leftovers(store) == []
    with pytest.raises(ModelNotFoundError, match="embedq models pull"):
        store.get("corrupt")


@pytest.mark.parametrize("name", ["minilm.tar.gz", "minilm.zip"])
def test_a_truncated_archive_is_refused_as_unreadable(
    tmp_path: Path, store: ModelStore, settings: Settings, packed: Callable[[Path], Path], name: str
) -> None:
    archive = packed(tmp_path / name)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 3 // 4])  # a transfer cut short, no sha256 to tell
    with pytest.raises(ModelError, match=f"{name} is not a readable archive"):
        store.pull(archive.as_uri(), "cut", PullOptions(), settings)
    assert store.list() == []
    assert leftovers(store) == []


def test_a_model_archive_over_the_byte_cap_is_refused(
    tmp_path: Path, store: ModelStore, packed: Callable[[Path], Path]
) -> None:
    archive = packed(tmp_path / "minilm.tar.gz")
    capped = Settings(
        model_dir=store.root, providers=["CPUExecutionProvider"], archive_max_bytes=50 * 1024**2
    )
    with pytest.raises(ModelError, match="EMBEDQ_ARCHIVE_MAX_BYTES"):
        store.pull(str(archive), "big", PullOptions(), capped)
    assert store.list() == [] and leftovers(store) == []


def test_a_lone_onnx_file_without_tokenizer_is_refused_clearly(
    minilm: Path,
    store: ModelStore,
    settings: Settings,
) -> None:
    with pytest.raises(ModelError, match=r"tokenizer\.json"):
        store.pull(
            (minilm / "model.onnx").as_uri(),
            "lonely",
            PullOptions(pooling=Pooling.MEAN, normalize=True, max_seq_length=256),
            settings,
        )
    assert store.list() == []


def test_a_failed_prepare_leaves_the_installed_model_untouched(
    minilm: Path,
    tmp_path: Path,
    store: ModelStore,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = onnx_folder(minilm, tmp_path / "plain")
    first = store.pull(str(source), "m", PullOptions(), settings)

    def crash(*args: object) -> None:
        raise ModelError("simulated crash during verification")

    monkeypatch.setattr(model_store, "_verify", crash)
    with pytest.raises(ModelError, match="simulated crash"):
        store.pull(str(source), "m", PullOptions(max_seq_length=64), settings)
    with pytest.raises(ModelError, match="simulated crash"):
        store.pull(str(source), "new", PullOptions(), settings)

    assert store.get("m") == first
    assert [m.name for m in store.list()] == ["m"]
    assert leftovers(store) == []


def test_int8_quantisation_stays_close_to_fp32(
    minilm: Path,
    engine: Engine,
    tmp_path: Path,
    store: ModelStore,
    settings: Settings,
    corpus: list[str],
) -> None:
    source = onnx_folder(minilm, tmp_path / "plain")
    manifest = store.pull(str(source), "int8", PullOptions(precision=Precision.INT8), settings)
    assert manifest.precision == Precision.INT8
    assert manifest.onnx_sha256 != Manifest.read(minilm).onnx_sha256
    texts = corpus[::97][:300]
    fp32 = engine.encode(texts).vectors
    int8 = Engine.load(store.path("int8"), settings).encode(texts).vectors
    similarity = cosines(int8, fp32)
    assert float(np.mean(similarity)) >= 0.99
    assert manifest.validation["int8_vs_fp32_mean_cosine"] >= 0.99


def test_fp16_is_fused_for_gpu_and_stays_close_to_fp32(
    minilm: Path,
    tmp_path: Path,
    store: ModelStore,
    settings: Settings,
    reference: np.ndarray,
) -> None:
    source = onnx_folder(minilm, tmp_path / "plain")
    manifest = store.pull(str(source), "fp16", PullOptions(precision=Precision.FP16), settings)
    assert (manifest.precision, manifest.steps) == (Precision.FP16, ("quantized:fp16",))
    assert manifest.validation["fp16_vs_fp32_min_cosine"] >= 0.999
    assert sorted(p.name for p in store.path("fp16").glob("model*")) == ["model.onnx"]
    # ONNX Runtime's CPU provider runs it (with casts); the GPU is where fp16 pays off.
    assert float(np.min(cosines(vectors(store.path("fp16"), settings), reference))) >= 0.999


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub(tmp_path / "hub") as hub:
        point_hub_at(hub.endpoint, monkeypatch)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        yield hub


def test_a_hub_repository_with_onnx_is_downloaded_without_its_weights(
    minilm: Path,
    checkpoint: Path,
    fake_hub: FakeHub,
    store: ModelStore,
    settings: Settings,
    reference: np.ndarray,
) -> None:
    files: dict[str, Path | bytes] = {"onnx/model.onnx": minilm / "model.onnx"}
    for path in checkpoint.rglob("*"):
        if path.is_file():
            files[str(path.relative_to(checkpoint))] = path
    fake_hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", files)

    manifest = store.pull(
        "hf://sentence-transformers/all-MiniLM-L6-v2", "hub", PullOptions(), settings
    )

    assert manifest.created_by == "downloaded"
    assert manifest.revision is not None and len(manifest.revision) == 40
    fetched = {r.split()[1].rsplit("/", 1)[-1] for r in fake_hub.requests if r.startswith("GET")}
    assert {"model.onnx", "tokenizer.json", "modules.json"} <= fetched
    assert "model.safetensors" not in fetched
    assert (store.path("hub") / "1_Pooling" / "config.json").is_file()
    np.testing.assert_allclose(vectors(store.path("hub"), settings), reference, atol=1e-6)


def test_a_hub_checkpoint_without_onnx_is_exported(
    minilm: Path,
    checkpoint: Path,
    fake_hub: FakeHub,
    store: ModelStore,
    settings: Settings,
    reference: np.ndarray,
) -> None:
    files: dict[str, Path | bytes] = {
        str(p.relative_to(checkpoint)): p for p in checkpoint.rglob("*") if p.is_file()
    }
    fake_hub.add_repo("acme/minilm-checkpoint", files)
    manifest = store.pull("hf://acme/minilm-checkpoint@main", "exported", PullOptions(), settings)
    assert manifest.created_by == "exported"
    assert manifest.validation["min_cosine"] >= 0.9999
    assert float(np.min(cosines(vectors(store.path("exported"), settings), reference))) >= 0.99999


def test_an_unknown_hub_repository_is_not_found(
    fake_hub: FakeHub, store: ModelStore, settings: Settings
) -> None:
    with pytest.raises(ModelNotFoundError, match="acme/nope"):
        store.pull("hf://acme/nope", "nope", PullOptions(), settings)
    assert store.list() == [] and leftovers(store) == []


def checkpoint_copy(checkpoint: Path, target: Path, *, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(checkpoint, target, ignore=shutil.ignore_patterns(*without))
    return target


def test_a_checkpoint_with_only_a_slow_tokenizer_gets_a_converted_one(
    minilm: Path,
    checkpoint: Path,
    tmp_path: Path,
    store: ModelStore,
    settings: Settings,
    reference: np.ndarray,
) -> None:
    source = checkpoint_copy(checkpoint, tmp_path / "slow", without=("tokenizer.json",))
    store.pull(str(source), "slow", PullOptions(), settings)
    assert not (source / "tokenizer.json").exists()  # the caller's folder is never written to
    similarity = cosines(vectors(store.path("slow"), settings), reference)
    assert float(np.min(similarity)) >= 0.99999


def test_an_export_that_differs_from_its_checkpoint_is_not_installed(
    checkpoint: Path,
    tmp_path: Path,
    store: ModelStore,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import export

    monkeypatch.setattr(export, "MAX_ABS_DIFF", 1e-12)  # stricter than float32 can be
    with pytest.raises(ExportError, match="refusing to install it"):
        store.pull(str(checkpoint), "strict", PullOptions(), settings)
    assert store.list() == [] and leftovers(store) == []


def test_a_quantised_model_that_drifts_too_far_is_not_installed(
    minilm: Path,
    tmp_path: Path,
    store: ModelStore,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(model_store._MIN_COSINE, Precision.INT8, 0.99999)
    with pytest.raises(ExportError, match=r"the int8 model differs too much"):
        store.pull(
            str(onnx_folder(minilm, tmp_path / "plain")),
            "q",
            PullOptions(precision=Precision.INT8),
            settings,
        )
    assert store.list() == [] and leftovers(store) == []
