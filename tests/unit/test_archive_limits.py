"""Model archives are checked before they are unpacked, and a download that cannot be unpacked
fails once, with its reason recorded for the batches waiting on it.

The archives are real files made here (a zip of 300 MiB of zeros is about 300 KiB); the store is
a real SQLite database; nothing but the broker (a list of sent messages) is replaced. (A source
that cannot be reached, retried then recorded failed: tests/integration/test_download_retries.py.)
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage import model_catalog
from storage.models import ModelState, PreparedModel
from storage.session import dispose_all, make_engine, scope, session_factory
from tasks import download, preparation
from worker import sources
from worker.app import app
from worker.errors import ModelError
from worker.model_store import ModelStore, PullOptions
from worker.settings import Settings

MIB = 1024**2
HOST = "gpu-host-1"


class Zeros(io.RawIOBase):
    """``size`` zero bytes, read in chunks: an archive's member without holding it in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def zeros_zip(path: Path, mib: int) -> Path:
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zipped,
        zipped.open("model.onnx", "w", force_zip64=True) as member,
    ):
        for _ in range(mib):
            member.write(bytes(MIB))
    return path


def zeros_tar_gz(path: Path, mib: int) -> Path:
    with tarfile.open(path, "w:gz") as tarred:
        info = tarfile.TarInfo("model.onnx")
        info.size = mib * MIB
        tarred.addfile(info, io.BufferedReader(Zeros(info.size)))
    return path


def many_files(path: Path, count: int) -> Path:
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as zipped:
            for index in range(count):
                zipped.writestr(f"m/file{index}.json", b"{}")
    else:
        with tarfile.open(path, "w:gz") as tarred:
            for index in range(count):
                info = tarfile.TarInfo(f"m/file{index}.json")
                info.size = 2
                tarred.addfile(info, io.BytesIO(b"{}"))
    return path


def written(staging: Path) -> list[str]:
    return sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))


def test_a_zip_bomb_is_refused_before_anything_is_unpacked(tmp_path: Path) -> None:
    bomb = zeros_zip(tmp_path / "bomb.zip", 300)
    assert bomb.stat().st_size < 1 * MIB
    staging = tmp_path / "staging"
    with pytest.raises(ModelError, match=r"300\.0 MiB or more.*EMBEDQ_ARCHIVE_MAX_BYTES=104857600"):
        sources.fetch(str(bomb), staging, max_bytes=100 * MIB)
    assert written(staging) == ["download-bomb.zip"]


def test_a_tar_gz_bomb_is_refused_before_anything_is_unpacked(tmp_path: Path) -> None:
    bomb = zeros_tar_gz(tmp_path / "bomb.tar.gz", 64)
    staging = tmp_path / "staging"
    with pytest.raises(ModelError, match=r"over the limit of 32\.0 MiB"):
        sources.fetch(str(bomb), staging, max_bytes=32 * MIB)
    assert written(staging) == ["download-bomb.tar.gz"]


def test_a_zip_member_that_inflates_past_its_declared_size_is_cut_there_and_refused(
    tmp_path: Path,
) -> None:
    # Why the declared sizes are a sufficient cap: zipfile writes no more of a member than
    # the central directory declares, then finds the CRC wrong.
    archive = zeros_zip(tmp_path / "liar.zip", 10)
    data = bytearray(archive.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the member's central directory record
    assert int.from_bytes(data[entry + 24 : entry + 28], "little") == 10 * MIB
    data[entry + 24 : entry + 28] = (1000).to_bytes(4, "little")  # declare 1000 bytes
    archive.write_bytes(bytes(data))
    staging = tmp_path / "staging"
    with pytest.raises(ModelError, match="not a readable archive: Bad CRC-32"):
        sources.fetch(str(archive), staging, max_bytes=2000)
    assert (staging / "files" / "model.onnx").stat().st_size <= 1000


@pytest.mark.parametrize("name", ["many.zip", "many.tar.gz"])
def test_an_archive_with_too_many_entries_is_refused(tmp_path: Path, name: str) -> None:
    archive = many_files(tmp_path / name, 11)
    staging = tmp_path / "staging"
    with pytest.raises(ModelError, match=r"more than 10 entries.*EMBEDQ_ARCHIVE_MAX_MEMBERS"):
        sources.fetch(str(archive), staging, max_members=10)
    assert written(staging) == [f"download-{name}"]


@pytest.mark.parametrize("name", ["many.zip", "many.tar.gz"])
def test_an_archive_at_the_caps_is_unpacked(tmp_path: Path, name: str) -> None:
    archive = many_files(tmp_path / name, 10)  # ten entries of two bytes, no folder entry
    fetched = sources.fetch(str(archive), tmp_path / "staging", max_bytes=20, max_members=10)
    assert len(list(fetched.folder.iterdir())) == 10


@pytest.mark.parametrize(
    ("variable", "value", "archive"),
    [
        ("EMBEDQ_ARCHIVE_MAX_BYTES", 16 * MIB, "bomb.zip"),
        ("EMBEDQ_ARCHIVE_MAX_MEMBERS", 5, "many.zip"),
    ],
)
def test_a_pull_is_capped_by_the_setting_its_refusal_names(
    tmp_path: Path, variable: str, value: int, archive: str
) -> None:
    path = zeros_zip(tmp_path / archive, 64) if archive == "bomb.zip" else tmp_path / archive
    if archive == "many.zip":
        many_files(path, 6)
    # The variable the refusal names is the setting's own: its name less the prefix.
    given: dict[str, Any] = {variable.removeprefix("EMBEDQ_").lower(): value}
    settings = Settings(**given)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelError, match=variable):
        store.pull(str(path), "m", PullOptions(), settings)
    assert store.list() == []
    assert [p.name for p in store.root.iterdir()] == [".locks"]  # the staging folder is gone


# --- the download task ---------------------------------------------------------------------


@dataclass
class Fleet:
    """This process as a worker host on a SQLite store: the settings the download task reads
    from the environment (a worker's entry point), and the same as an object for the plain
    functions."""

    sessions: sessionmaker[Session]
    settings: Settings


@pytest.fixture
def fleet(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    values = {"database_url": sqlite_url, "host_name": HOST, "model_dir": tmp_path / "models"}
    for name, value in values.items():  # the task, as a worker, reads its environment
        monkeypatch.setenv(f"EMBEDQ_{name.upper()}", str(value))
    sent: list[Any] = []
    monkeypatch.setattr(app, "send_task", lambda *a, **k: sent.append((a, k)))
    engine = make_engine(sqlite_url)
    yield Fleet(session_factory(engine), Settings(**values))  # type: ignore[arg-type]
    engine.dispose()
    dispose_all()
    assert sent == [], "no download may be sent again for a recorded failure"


def register(fleet: Fleet, source: str) -> None:
    with scope(fleet.sessions) as session:
        model_catalog.register_source(session, "m", source, {})


def host_row(fleet: Fleet) -> PreparedModel:
    with scope(fleet.sessions) as session:
        row = model_catalog.get_prepared(session, "m", HOST)
        assert row is not None
        session.expunge(row)
        return row


def test_a_truncated_archive_fails_its_download_once_with_the_reason(
    tmp_path: Path, fleet: Fleet
) -> None:
    archive = many_files(tmp_path / "m.tar.gz", 50)
    archive.write_bytes(archive.read_bytes()[:200])
    register(fleet, str(archive))

    result = download.download.apply(args=["m"]).get()  # eager: a retry would run here too

    assert "m.tar.gz is not a readable archive" in result["failed"]
    row = host_row(fleet)
    assert row.state == ModelState.FAILED
    assert row.error is not None and "m.tar.gz is not a readable archive" in row.error
    with pytest.raises(ModelError, match=f"could not be prepared on {HOST}: .*readable archive"):
        preparation.request("m", fleet.sessions, fleet.settings)


def test_an_unexpected_error_is_recorded_as_the_hosts_failure(
    tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(fleet, str(many_files(tmp_path / "m.zip", 3)))

    def broken(*args: object, **kwargs: object) -> None:  # a bug, not an EmbedqError
        raise EOFError("ran out of input")

    monkeypatch.setattr(sources, "fetch", broken)
    result = download.download.apply(args=["m"]).get()

    reason = "preparing it failed unexpectedly: EOFError: ran out of input"
    assert result["failed"] == reason
    assert (host_row(fleet).state, host_row(fleet).error) == (ModelState.FAILED, reason)
