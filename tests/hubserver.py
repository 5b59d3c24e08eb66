"""A loopback fake of the Hugging Face Hub, for huggingface_hub 2.4.0 in tests.

Endpoints: ``GET /api/models/<repo>[/revision/<rev>]`` (model_info), ``GET /api/models/<repo>/tree/
<rev>[/<dir>]`` (list_repo_files, snapshot_download), ``HEAD|GET /<repo>/resolve/<rev>/<file>``
(hf_hub_download; streamed, Range honoured, no redirects). ``main`` or any 40-hex revision serves
the folder as it is. No ``X-Xet-*`` header is sent, so downloads use plain HTTP even with hf_xet.
"""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import pytest

_HEX40 = re.compile(r"[0-9a-f]{40}")
_LFS_SUFFIXES = {".safetensors", ".onnx", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".npy"}
_ROUTE = re.compile(
    r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?"
    r"|/([^/]+/[^/]+)/resolve/([^/]+)/(.+)"
)


def point_hub_at(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point an already-imported huggingface_hub 2.4.0 at ``endpoint``, undone by ``monkeypatch``.

    ``HF_ENDPOINT`` is only read when ``huggingface_hub.constants`` is imported. After that, patch
    ``constants.ENDPOINT`` (each new ``HfApi()``, so snapshot_download),
    ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (hf_hub_url, so hf_hub_download),
    ``hf_api.api.endpoint`` (the import-time HfApi behind ``huggingface_hub.model_info`` etc.) and
    ``constants.HF_HUB_OFFLINE`` (if true, every request raises OfflineModeIsEnabled).
    HF_HUB_DISABLE_XET may stay as it is. ``constants.HF_URL_HOSTS`` and
    ``utils._http._HUB_ORIGINS`` only matter for redirects, which this server never sends.
    """
    from huggingface_hub import constants, hf_api

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


class FakeHub:
    """Serves repos from a folder over loopback HTTP in the shape of the Hugging Face Hub.

    ``requests`` records ``"<METHOD> <unquoted path>"`` (no query) per request, e.g.
    ``"GET /org/name/resolve/main/onnx/model.onnx"``; snapshot_download fetches in threads.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.endpoint = ""
        self.requests: list[str] = []
        self._hashes: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, files: dict[str, Path | bytes]) -> None:
        """Fill ``root/<repo_id>/``: repo path -> its content, or a file to symlink to."""
        for name, src in files.items():
            dest = self.root / repo_id / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            if isinstance(src, bytes):
                dest.write_bytes(src)
            else:
                dest.symlink_to(Path(src).absolute())

    def __enter__(self) -> Self:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Handler,), {"hub": self}))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def files(self, repo_id: str) -> list[str]:
        """Sorted repo paths of every file in the repo."""
        base = self.root / repo_id
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

    def hashes(self, path: Path) -> tuple[str, str]:
        """(git blob sha1, sha256) of a file in one streamed pass, cached by (path, size, mtime)."""
        key = (str(path), (st := path.stat()).st_size, st.st_mtime_ns)
        if key not in self._hashes:
            sha1, sha256 = hashlib.sha1(b"blob %d\0" % st.st_size), hashlib.sha256()
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    sha1.update(chunk)
                    sha256.update(chunk)
            self._hashes[key] = (sha1.hexdigest(), sha256.hexdigest())
        return self._hashes[key]

    def commit(self, repo_id: str) -> str:
        """The commit ``main`` resolves to: a sha1 of the repo's content, changing with it."""
        content = [(n, self.entry(repo_id, n)["oid"]) for n in self.files(repo_id)]
        return hashlib.sha1(json.dumps([repo_id, content]).encode()).hexdigest()

    def entry(self, repo_id: str, name: str) -> dict[str, Any]:
        """The hub's tree JSON for a file; weights and >10 MiB files get an ``lfs`` block."""
        size = (path := self.root / repo_id / name).stat().st_size
        sha1, sha256 = self.hashes(path)
        item: dict[str, Any] = {"type": "file", "oid": sha1, "size": size, "path": name}
        if path.suffix in _LFS_SUFFIXES or size > 10 << 20:
            item["lfs"] = {"oid": sha256, "sha256": sha256, "size": size, "pointerSize": 134}
        return item


class _Handler(BaseHTTPRequestHandler):
    """Answers one connection for ``hub`` (set on a per-server subclass)."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the access log off stderr."""

    def _head(self, code: int, headers: dict[str, str]) -> None:
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _send(self, code: int, obj: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        self._head(code, {**headers, "Content-Length": str(len(data))})
        if self.command == "GET":
            self.wfile.write(data)

    def _error(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})}
        self._send(404, {"error": message}, headers)

    def do_GET(self) -> None:
        """Route a HEAD or GET: model info, tree listing or file."""
        hub, url = self.hub, urlsplit(self.path)
        hub.requests.append(f"{self.command} {unquote(url.path)}")
        m = _ROUTE.fullmatch(url.path)
        repo_id = unquote(m[1] or m[5]) if m else ""
        if not m or ".." in repo_id or not (hub.root / repo_id).is_dir():
            return self._error("RepoNotFound", "Repository not found")
        kind, rev = m[2] or ("resolve" if m[5] else "revision"), unquote(m[3] or m[6] or "main")
        name = unquote(m[4] or m[7] or "").strip("/")
        if rev != "main" and not _HEX40.fullmatch(rev):
            return self._error("RevisionNotFound", f"Invalid rev id: {rev}")
        commit, files = (rev if rev != "main" else hub.commit(repo_id)), hub.files(repo_id)
        if kind == "resolve":
            return self._file(repo_id, name, commit, files)
        if kind == "tree":
            return self._send(200, self._tree(repo_id, name, files, "recursive=true" in url.query))
        keys = {"path": "rfilename", "size": "size", "oid": "blobId", "lfs": "lfs"}
        keys = keys if "blobs=true" in url.query else {"path": "rfilename"}
        entries = [hub.entry(repo_id, n) for n in files]
        sibs = [{v: e.get(k) for k, v in keys.items()} for e in entries]
        self._send(200, dict(id=repo_id, modelId=repo_id, sha=commit, private=False, siblings=sibs))

    do_HEAD = do_GET

    def _tree(self, repo_id: str, sub: str, files: list[str], deep: bool) -> list[dict[str, Any]]:
        pre = f"{sub}/" if sub else ""
        rel = [n[len(pre) :] for n in files if n.startswith(pre)]
        dirs = {"/".join(r.split("/")[:i]) for r in rel for i in range(1, r.count("/") + 1)}
        if not deep:
            rel, dirs = [r for r in rel if "/" not in r], {d for d in dirs if "/" not in d}
        out = [{"type": "directory", "size": 0, "path": pre + d} for d in sorted(dirs)]
        out = [{**d, "oid": hashlib.sha1(str(d["path"]).encode()).hexdigest()} for d in out]
        return out + [self.hub.entry(repo_id, pre + r) for r in rel]

    def _file(self, repo_id: str, name: str, commit: str, files: list[str]) -> None:
        if name not in files:
            return self._error("EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        item = self.hub.entry(repo_id, name)
        size, etag = item["size"], (item.get("lfs") or item)["oid"]
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "X-Repo-Commit": commit, "ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"',
                   "X-Linked-Size": str(size)}  # fmt: skip
        start, end, code = 0, size - 1, 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng and int(rng[1]) < size:
            start, end, code = int(rng[1]), min(int(rng[2] or end), end), 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._head(code, {**headers, "Content-Length": str(end - start + 1)})
        with (self.hub.root / repo_id / name).open("rb") as fh:
            fh.seek(start)
            left = (end - start + 1) if self.command == "GET" else 0
            while left > 0 and (chunk := fh.read(min(left, 1 << 20))):
                self.wfile.write(chunk)
                left -= len(chunk)
