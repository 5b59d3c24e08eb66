import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from worker import sources
from worker.errors import ChecksumMismatchError, ModelError, ModelNotFoundError


def test_an_unknown_source_is_a_clear_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model source"):
        sources.fetch("no-such-folder-or-scheme", tmp_path / "staging")


def test_a_missing_file_url_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file"):
        sources.fetch((tmp_path / "gone.onnx").as_uri(), tmp_path / "staging")


def test_a_download_with_the_wrong_sha256_is_refused_and_removed(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not what the publisher hashed")
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ChecksumMismatchError, match="refusing to install"):
        sources.fetch(model.as_uri(), tmp_path / "staging", sha256=wrong)
    assert not any((tmp_path / "staging").rglob("*.onnx"))


def test_a_download_with_the_right_sha256_is_kept(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx bytes")
    fetched = sources.fetch(
        model.as_uri(),
        tmp_path / "staging",
        sha256=hashlib.sha256(b"onnx bytes").hexdigest().upper(),
    )
    assert fetched.onnx is not None and fetched.onnx.read_bytes() == b"onnx bytes"
    assert fetched.revision == "sha256:" + hashlib.sha256(b"onnx bytes").hexdigest()


def test_a_zip_with_an_escaping_path_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("../evil.onnx", b"x")
    archive = tmp_path / "model.zip"
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(ModelError, match="unsafe path"):
        sources.fetch(str(archive), tmp_path / "staging")
    assert not (tmp_path / "evil.onnx").exists()


def test_a_url_that_is_neither_onnx_nor_archive_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"neither an \.onnx file nor an archive"):
        sources.fetch("https://example.invalid/model.bin", tmp_path / "staging")
