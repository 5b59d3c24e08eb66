"""Model sources: where a model's files come from, fetched into a staging folder.

Three kinds, told apart by the source string:
- ``hf://ORG/NAME[@REVISION]``: the Hugging Face Hub through huggingface_hub, which honours
  HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN. The repository's ONNX file when it has one
  (sentence-transformers keeps it at ``onnx/model.onnx``) plus the tokenizer and the
  sentence-transformers configs; with none, the checkpoint, to be exported.
- ``https://``, ``http://`` or ``file://`` URLs to an .onnx file or an archive (.tar.gz, .tgz,
  .tar, .zip), verified against an optional sha256 before anything is unpacked. An archive is
  listed before it is unpacked and refused when its members would add up to more bytes or
  entries than the caps allow (``EMBEDQ_ARCHIVE_MAX_BYTES``, ``EMBEDQ_ARCHIVE_MAX_MEMBERS``),
  so a zip bomb writes nothing; one that cannot be read is a permanent ``ModelError``.
- A local directory: a folder holding model.onnx and tokenizer.json, or an HF checkpoint.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from worker.errors import (
    ChecksumMismatchError,
    ModelError,
    ModelNotFoundError,
    SourceUnavailableError,
)

ONNX_CANDIDATES = ("onnx/model.onnx", "model.onnx")
# Files that describe the model's behaviour and tokenizer; copied into the store.
CONFIG_FILES = (
    "tokenizer.json",
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
POOLING_CONFIG = "*Pooling/config.json"
# What an export needs from a checkpoint repository (weights in safetensors or torch format).
CHECKPOINT_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "pytorch_model.bin"]
_ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")
# The defaults of the settings archive_max_bytes and archive_max_members (worker/settings.py),
# which the model store passes in; this module never reads settings.
ARCHIVE_MAX_BYTES = 32 * 1024**3
ARCHIVE_MAX_MEMBERS = 10_000
# What a damaged archive raises while it is read: a truncated gzip stream ends in EOFError, a
# damaged deflate stream in zlib.error, a bad gzip header or CRC in BadGzipFile (an OSError).
_UNREADABLE = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile)


@dataclass(frozen=True)
class Fetched:
    """A source's files in a local folder: an ONNX model with its tokenizer, or a checkpoint."""

    folder: Path
    onnx: Path | None
    revision: str | None = None


@dataclass(frozen=True)
class Caps:
    """The most an archive may unpack to: bytes of its members added up, and entries."""

    max_bytes: int
    max_members: int


def fetch(
    source: str,
    staging: Path,
    *,
    sha256: str | None = None,
    max_bytes: int = ARCHIVE_MAX_BYTES,
    max_members: int = ARCHIVE_MAX_MEMBERS,
) -> Fetched:
    """Bring ``source``'s files into ``staging`` (created), without installing anything.

    An archive may unpack to at most ``max_bytes`` bytes in at most ``max_members`` entries.
    """
    staging.mkdir(parents=True, exist_ok=True)
    if source.startswith("hf://"):
        if sha256:
            raise ModelError("--sha256 applies to URLs; a hub revision pins hf:// sources")
        repo, _, revision = source.removeprefix("hf://").partition("@")
        return _fetch_hub(repo, revision or None, staging)
    if source.startswith(("https://", "http://", "file://")):
        return _fetch_url(source, staging, sha256, Caps(max_bytes, max_members))
    path = Path(source).expanduser()
    if path.is_dir():
        if sha256:
            raise ModelError("--sha256 applies to URLs and files, not folders")
        return Fetched(folder=path.resolve(), onnx=find_onnx(path))
    if path.is_file():
        return _fetch_url(path.resolve().as_uri(), staging, sha256, Caps(max_bytes, max_members))
    raise ModelNotFoundError(
        f"unknown model source {source!r}: expected hf://ORG/NAME[@REV], an http(s):// or"
        " file:// URL, or an existing folder"
    )


def find_onnx(folder: Path) -> Path | None:
    """The model's ONNX file inside ``folder``, where sentence-transformers repos keep it."""
    for candidate in ONNX_CANDIDATES:
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_hub(repo: str, revision: str | None, staging: Path) -> Fetched:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(repo, revision=revision)
        files = {sibling.rfilename for sibling in info.siblings or []}
        onnx = next((c for c in ONNX_CANDIDATES if c in files), None)
        if onnx is not None:
            patterns = [onnx, onnx + "_data", *CONFIG_FILES, POOLING_CONFIG]
        else:
            has_safetensors = any(f.endswith(".safetensors") for f in files)
            patterns = [
                p for p in CHECKPOINT_PATTERNS if not (has_safetensors and p == "pytorch_model.bin")
            ]
        folder = Path(
            snapshot_download(repo, revision=info.sha, allow_patterns=patterns, local_dir=staging)
        )
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModelNotFoundError(f"hub repository {repo}@{revision or 'main'}: {exc}") from exc
    except LocalEntryNotFoundError as exc:
        raise SourceUnavailableError(f"hub repository {repo} is not reachable: {exc}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        error = ModelError if 400 <= status < 500 else SourceUnavailableError
        raise error(f"hub repository {repo}: {exc}") from exc
    except OSError as exc:  # connection refused, DNS, timeouts
        raise SourceUnavailableError(f"hub repository {repo} is not reachable: {exc}") from exc
    return Fetched(folder=folder, onnx=find_onnx(folder), revision=info.sha)


def _fetch_url(url: str, staging: Path, sha256: str | None, caps: Caps) -> Fetched:
    name = Path(urllib.request.url2pathname(url.split("?")[0].rsplit("/", 1)[-1])).name
    if not (name.endswith(".onnx") or name.endswith(_ARCHIVES)):
        raise ModelError(f"{url} is neither an .onnx file nor an archive ({', '.join(_ARCHIVES)})")
    download = staging / ("download-" + name)
    _download(url, download)
    digest = sha256_of(download)
    if sha256 and digest != sha256.lower():
        download.unlink()
        raise ChecksumMismatchError(
            f"{url} has sha256 {digest}, expected {sha256.lower()}: refusing to install it"
        )
    folder = staging / "files"
    if name.endswith(".onnx"):
        folder.mkdir()
        download.rename(folder / "model.onnx")
        return Fetched(folder=folder, onnx=folder / "model.onnx", revision=f"sha256:{digest}")
    _unpack(download, folder, caps)
    download.unlink()
    root = _archive_root(folder)
    return Fetched(folder=root, onnx=find_onnx(root), revision=f"sha256:{digest}")


def _download(url: str, target: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except urllib.error.HTTPError as exc:
        error = ModelNotFoundError if exc.code in (401, 403, 404) else SourceUnavailableError
        raise error(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, FileNotFoundError):
            raise ModelNotFoundError(f"{url}: no such file") from exc
        raise SourceUnavailableError(f"{url} is not reachable: {exc.reason}") from exc
    except OSError as exc:
        raise SourceUnavailableError(f"{url} is not reachable: {exc}") from exc


def _unpack(archive: Path, folder: Path, caps: Caps) -> None:
    """Unpack ``archive`` into ``folder`` (created), after its listing was checked against
    ``caps``: a refused or unreadable archive leaves no ``folder`` behind."""
    try:
        if archive.name.endswith(".zip"):
            _unpack_zip(archive, folder, caps)
        else:
            _unpack_tar(archive, folder, caps)
    except _FILTER_ERRORS as exc:  # refused by the "data" filter, where Python has it
        raise ModelError(f"{archive.name} holds an unsafe entry: {exc}") from exc
    except _UNREADABLE as exc:
        raise ModelError(f"{archive.name} is not a readable archive: {exc}") from exc
    except OSError as exc:  # writing failed: disk full, permissions
        raise ModelError(f"cannot unpack {archive.name} into {folder}: {exc}") from exc


def _unpack_zip(archive: Path, folder: Path, caps: Caps) -> None:
    with zipfile.ZipFile(archive) as zipped:
        members = zipped.infolist()  # the central directory, read when the file is opened
        _check_caps(archive, len(members), sum(m.file_size for m in members), caps)
        for member in members:
            path = Path(member.filename)
            if path.is_absolute() or ".." in path.parts:
                raise ModelError(f"{archive.name} holds an unsafe path {member.filename!r}")
            if stat.S_ISLNK(member.external_attr >> 16):
                raise ModelError(f"{archive.name} holds a symbolic link {member.filename!r}")
        # The declared sizes bound what is written: zipfile stops reading a member at its
        # declared file_size and then checks its CRC, so a member that inflates to more raises
        # BadZipFile instead of filling the disk; overlapping members are each counted.
        folder.mkdir()
        zipped.extractall(folder)


def _unpack_tar(archive: Path, folder: Path, caps: Caps) -> None:
    with tarfile.open(archive) as tarred:
        # Reading the headers decompresses the stream but writes nothing. The count stops at the
        # first entry over a cap, so a listing of millions of entries is not held in memory.
        count = total = 0
        for member in tarred:
            count += 1
            total += member.size  # a sparse file counts at its full size
            if count > caps.max_members or total > caps.max_bytes:
                break
            _check_member(archive, member)
        _check_caps(archive, count, total, caps)
        folder.mkdir()
        if hasattr(tarfile, "data_filter"):
            # The "data" filter as well: it also drops setuid bits and group/other write.
            tarred.extractall(folder, filter="data")
        else:  # Python 3.11.0-3.11.3 (Debian 12's 3.11.2): the checks above alone
            tarred.extractall(folder)


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Only files and folders, inside the archive's folder: no absolute path, no "..", no link,
    no device. Stricter than Python's "data" filter (which allows links that stay inside), and
    the same on every Python 3.11, some of whose releases have no filter."""
    path = Path(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise ModelError(f"{archive.name} holds an unsafe entry: the path {member.name!r}")
    if not (member.isfile() or member.isdir()):
        kind = "link" if member.issym() or member.islnk() else "device or special file"
        raise ModelError(f"{archive.name} holds an unsafe entry: {member.name!r} is a {kind}")


_FILTER_ERRORS: tuple[type[Exception], ...] = tuple(
    error for error in [getattr(tarfile, "FilterError", None)] if error is not None
)


def _check_caps(archive: Path, count: int, total: int, caps: Caps) -> None:
    if count > caps.max_members:
        raise ModelError(
            f"{archive.name} holds more than {caps.max_members} entries, the most an archive may"
            " hold (EMBEDQ_ARCHIVE_MAX_MEMBERS): refusing to unpack it"
        )
    if total > caps.max_bytes:
        raise ModelError(
            f"{archive.name} unpacks to {_mib(total)} MiB or more, over the limit of"
            f" {_mib(caps.max_bytes)} MiB (EMBEDQ_ARCHIVE_MAX_BYTES={caps.max_bytes}): refusing"
            " to unpack it"
        )


def _mib(count: int) -> str:
    return f"{count / 1024**2:,.1f}"


def _archive_root(folder: Path) -> Path:
    """The folder inside an unpacked archive that holds the model (archives often wrap it in
    one top-level folder)."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder
