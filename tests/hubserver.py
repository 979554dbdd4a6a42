"""A small fake Hugging Face Hub for tests.

`FakeHub` runs a loopback HTTP server (stdlib `http.server`, 127.0.0.1, a free port, background
thread) that speaks enough of the Hub HTTP API for the *real* `huggingface_hub` client
(`snapshot_download`, `hf_hub_download`, `HfApi().model_info` / `repo_info` / `list_repo_tree` /
`get_paths_info`) to run against it.

`huggingface_hub` reads `HF_ENDPOINT` when it is imported, so the client must run in a subprocess
started with `hub.env(tmp_path / "hf")`:

    with FakeHub([HubRepo("org/tiny", repo_dir, revisions={"v1": "main"})]) as hub:
        subprocess.run([sys.executable, "-c", code], env=hub.env(tmp_path / "hf"), check=True)
        assert not any(p.endswith(".bin") for _, p in hub.requests)

Endpoints (`{type}` is `models`, `datasets` or `spaces`; revisions are percent-decoded, so
`refs%2Fpr%2F1` works):

    GET       /api/{type}/{repo_id}                        repo info at "main"
    GET       /api/{type}/{repo_id}/revision/{rev}         repo info at a revision
    GET       /api/{type}/{repo_id}/tree/{rev}[/{path}]    tree listing (?recursive=true)
    POST      /api/{type}/{repo_id}/paths-info/{rev}       paths info (form or JSON `paths`)
    HEAD/GET  [/{datasets|spaces}]/{repo_id}/resolve/{rev}/{path}
                                                           file metadata / contents (Range ok)
    HEAD/GET  /lfs/{sha256}/{path}   on `FakeHub.cdn_url`  LFS "CDN", only when lfs_redirect=True

What the client relies on, mirrored from the Hub:

* `X-Repo-Commit` (the resolved 40-hex commit) on every resolve response, errors included.
* Small (git) files: `ETag: "<git blob sha1>"`, `Content-Length`.
* Large (LFS) files: `ETag`/`X-Linked-Etag: "<sha256>"`, `X-Linked-Size`; the client stores the
  blob in its cache under that sha256. With `lfs_redirect=True` the resolve call answers
  `302 Location: <cdn_url>/lfs/...` to a second loopback port (a different origin, like the
  real CDN) and the client downloads from there.
* Tree / paths-info entries: `{"type", "path", "size", "oid"}` plus
  `"lfs": {"oid": sha256, "size", "pointerSize"}` for LFS files (`oid` is then the git sha1 of
  the LFS pointer file, as on the Hub).
* Errors: `X-Error-Code` `RepoNotFound` (401 without an Authorization header, 404 with one, as
  the Hub does) -> `RepositoryNotFoundError`; `RevisionNotFound` (404) ->
  `RevisionNotFoundError`; `EntryNotFound` (404) -> `EntryNotFoundError`.

Every request is logged as `(method, path)` in `FakeHub.requests` (path percent-decoded, query
string dropped). Nothing is written to stderr.

Failure modes (keyword options of `FakeHub`, for testing how a client copes with a bad server):

* `hang=True`: every request is read and logged, then never answered (the connection stays open
  until `stop()` or `max_stall` seconds).
* `stall={"model.safetensors": 1000}`: a GET of that file sends its headers (full Content-Length)
  and the file's bytes up to that absolute offset, then stalls like `hang` (a resumed Range
  request starting at or past the offset stalls at once).
* `fail={"model.safetensors": 500}`: a GET of that file's contents answers that HTTP status (HEAD,
  the metadata call, still succeeds, as when the storage behind the Hub fails).
* `corrupt={"model.safetensors"}`: a GET of that file serves its bytes with one byte flipped (in
  the middle), under the correct ETag, `X-Linked-Etag` and size.
* A repo built with `HubRepo(..., raw_names=True)` lists its `files` keys verbatim, so a hostile
  listing (`"../../evil.safetensors"`, `"/abs/evil.safetensors"`) can be served.

`stop()` releases every stalled or hanging request, so a test never waits longer than its client.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["FakeHub", "HubRepo", "HubFile"]

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 1 << 20

# Patterns of the default `.gitattributes` of a Hub repo (files stored with git LFS), plus gguf.
DEFAULT_LFS_PATTERNS: tuple[str, ...] = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
    "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
    "saved_model/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst",
    "*tfevents*",
)
# The Hub refuses plain-git files above 10 MB: anything bigger is LFS whatever its name.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_FIXED_DATE = "2024-01-01T00:00:00.000Z"


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """One file of a repo, with the hashes the Hub reports for it."""

    path: str  # path in repo, "/"-separated
    local: Path
    size: int
    sha256: str
    git_sha1: str  # git blob sha1 of the content (small files) or of the LFS pointer (LFS files)
    lfs: bool
    pointer_size: int | None

    @property
    def etag(self) -> str:
        """The ETag the client must see (sha256 for LFS files, git blob sha1 otherwise)."""
        return self.sha256 if self.lfs else self.git_sha1

    def tree_entry(self) -> dict:
        entry: dict = {"type": "file", "oid": self.git_sha1, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry


def _hash_file(local: Path) -> tuple[int, str, str]:
    """(size, sha256, git blob sha1) of a file, read in chunks."""
    size = local.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with open(local, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return size, sha256.hexdigest(), sha1.hexdigest()


class HubRepo:
    """A repo served by `FakeHub`.

    Args:
        repo_id: "namespace/name" (or a bare "name").
        files: mapping path-in-repo -> local file, or a directory whose files (recursively, `.git/`
            excluded) are all served under their relative paths.
        revisions: extra revisions, name -> target. A name may be a branch, a tag, a PR ref
            ("refs/pr/1") or a 40-hex commit sha. The target is a 40-hex commit sha (the commit the
            name resolves to; that sha then becomes a valid revision too) or the name of another
            revision ("main", another key). A 40-hex name resolves to itself. All revisions serve
            the same files. "main" always exists; its deterministic commit is `self.sha` (sha1 of
            the repo id and of every path and file sha256) unless `revisions` overrides "main".
        repo_type: "model" (default), "dataset" or "space".
        lfs_patterns: fnmatch patterns (matched on the full path and on the basename) of files
            stored as LFS; defaults to the Hub's default `.gitattributes`. Files above 10 MiB are
            LFS whatever their name.
        raw_names: use the keys of a `files` mapping verbatim (no stripping of "/"), so that a
            test can serve a hostile listing with absolute or `..` names.
    """

    def __init__(
        self,
        repo_id: str,
        files: dict[str, Path] | Path,
        revisions: dict[str, str] | None = None,
        *,
        repo_type: str = "model",
        lfs_patterns: tuple[str, ...] | list[str] | None = None,
        raw_names: bool = False,
    ) -> None:
        if repo_type not in ("model", "dataset", "space"):
            raise ValueError(f"unsupported repo_type {repo_type!r}")
        self.repo_id = repo_id
        self.repo_type = repo_type
        patterns = tuple(DEFAULT_LFS_PATTERNS if lfs_patterns is None else lfs_patterns)

        if isinstance(files, (str, os.PathLike)):
            root = Path(files)
            if not root.is_dir():
                raise ValueError(f"{root} is not a directory")
            mapping = {
                p.relative_to(root).as_posix(): p
                for p in sorted(root.rglob("*"))
                if p.is_file() and ".git" not in p.relative_to(root).parts
            }
        else:
            mapping = {(str(k) if raw_names else str(k).strip("/")): Path(v) for k, v in files.items()}

        self.files: dict[str, HubFile] = {}
        for path in sorted(mapping):
            local = mapping[path]
            size, sha256, sha1 = _hash_file(local)
            name = path.rsplit("/", 1)[-1]
            lfs = size > LFS_SIZE_THRESHOLD or any(
                fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(name, pat) for pat in patterns
            )
            pointer_size = None
            if lfs:
                pointer = _lfs_pointer(sha256, size)
                sha1, pointer_size = _git_blob_sha1(pointer), len(pointer)
            self.files[path] = HubFile(path, local, size, sha256, sha1, lfs, pointer_size)

        digest = hashlib.sha1(f"{repo_type}:{repo_id}\n".encode())
        for f in self.files.values():
            digest.update(f"{f.path}\0{f.sha256}\n".encode())
        self.sha: str = digest.hexdigest()

        self.revisions: dict[str, str] = dict(revisions or {})
        # Resolve every revision name eagerly so that configuration errors surface here.
        self._resolved: dict[str, str] = {"main": self.sha}
        for name in self.revisions:
            self._resolved[name] = self._resolve_name(name, ())
        if "main" in self.revisions:
            self._resolved["main"] = self._resolve_name("main", ())
        for commit in list(self._resolved.values()):
            self._resolved.setdefault(commit, commit)

    def _resolve_name(self, name: str, seen: tuple[str, ...]) -> str:
        if name in seen:
            raise ValueError(f"revision cycle in {self.repo_id}: {' -> '.join(seen + (name,))}")
        if _SHA_RE.match(name):
            return name
        if name not in self.revisions:
            if name == "main":
                return self.sha
            raise ValueError(f"revision {name!r} of {self.repo_id} points to unknown revision")
        target = self.revisions[name]
        if _SHA_RE.match(target):
            return target
        return self._resolve_name(target, seen + (name,))

    def resolve(self, revision: str) -> str | None:
        """The commit sha `revision` resolves to, or None if unknown."""
        return self._resolved.get(revision)

    # -- JSON payloads -------------------------------------------------------------------------

    def info(self, commit: str, blobs: bool = False, expand: list[str] | None = None) -> dict:
        siblings = []
        for f in self.files.values():
            sib: dict = {"rfilename": f.path}
            if blobs:
                sib["size"] = f.size
                sib["blobId"] = f.git_sha1
                if f.lfs:
                    sib["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": f.pointer_size}
            siblings.append(sib)
        author = self.repo_id.split("/")[0] if "/" in self.repo_id else None
        data: dict = {
            "_id": hashlib.sha1(self.repo_id.encode()).hexdigest()[:24],
            "id": self.repo_id,
            "author": author,
            "sha": commit,
            "lastModified": _FIXED_DATE,
            "createdAt": _FIXED_DATE,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in self.files.values()),
        }
        if self.repo_type == "model":
            data["modelId"] = self.repo_id
            data["library_name"] = "transformers" if "config.json" in self.files else None
        if expand:
            keep = {"_id", "id", *expand}
            data = {k: v for k, v in data.items() if k in keep}
        return data

    def tree(self, prefix: str, recursive: bool) -> list[dict] | None:
        """Tree listing under `prefix` ("" = root), or None if `prefix` is not a folder."""
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        entries: list[dict] = []
        folders: dict[str, list[HubFile]] = {}
        for f in self.files.values():
            if not f.path.startswith(base):
                continue
            rel = f.path[len(base):]
            parts = rel.split("/")
            for i in range(1, len(parts)):
                folders.setdefault(base + "/".join(parts[:i]), []).append(f)
            if recursive or len(parts) == 1:
                entries.append(f.tree_entry())
        if prefix and not entries and not folders:
            return None
        for folder in sorted(folders):
            if recursive or "/" not in folder[len(base):]:
                entries.append({"type": "directory", "oid": self._tree_oid(folder), "path": folder})
        return sorted(entries, key=lambda e: e["path"])

    def _tree_oid(self, folder: str) -> str:
        digest = hashlib.sha1(f"tree:{folder}\n".encode())
        for f in self.files.values():
            if f.path.startswith(folder + "/"):
                digest.update(f"{f.path}\0{f.git_sha1}\n".encode())
        return digest.hexdigest()

    def path_info(self, path: str) -> dict | None:
        path = path.strip("/")
        if path in self.files:
            return self.files[path].tree_entry()
        if any(p.startswith(path + "/") for p in self.files):
            return {"type": "directory", "oid": self._tree_oid(path), "path": path}
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: "FakeHub", is_cdn: bool) -> None:
        self.hub = hub
        self.is_cdn = is_cdn
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request, client_address) -> None:  # noqa: D401 - keep stderr quiet
        pass


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args) -> None:  # silence the default stderr logging
        pass

    # -- plumbing ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        raw_segments = [s for s in split.path.split("/") if s]
        self.server.hub._log(method, unquote(split.path))
        self.query = parse_qs(split.query)
        body = b""
        if method == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.hub.hang:
            self._stall()
            return
        try:
            if self.server.is_cdn:
                self._cdn(method, raw_segments)
            elif raw_segments[:1] == ["api"]:
                self._api(method, raw_segments[1:], body)
            else:
                self._resolve(method, raw_segments)
        except _HubError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _stall(self) -> None:
        """Answer nothing more until the hub stops (or `max_stall` seconds), then drop the connection."""
        self.server.hub._stopping.wait(self.server.hub.max_stall)
        self.close_connection = True

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **headers}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _send_json(self, data, head: bool = False, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self._send(200, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body, head)

    def _send_error(self, e: _HubError) -> None:
        message = e.message.encode("ascii", "backslashreplace").decode().replace("\n", " ")
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": message}
        if e.code:
            headers["X-Error-Code"] = e.code
        if e.commit:
            headers["X-Repo-Commit"] = e.commit
        self._send(e.status, headers, json.dumps({"error": e.message}).encode(), self.command == "HEAD")

    def _not_found(self) -> _HubError:
        return _HubError(404, None, "Sorry, we can't find the page you are looking for.")

    def _repo(self, repo_type: str, candidates: list[str]) -> HubRepo:
        for repo_id in candidates:
            repo = self.server.hub._repos.get((repo_type, repo_id))
            if repo is not None:
                return repo
        if self.headers.get("Authorization"):
            raise _HubError(404, "RepoNotFound", "Repository not found")
        # The Hub answers 401 for unknown repos to unauthenticated clients (same as private ones).
        raise _HubError(401, "RepoNotFound", "Invalid username or password.")

    def _commit(self, repo: HubRepo, revision: str) -> str:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    # -- /api ----------------------------------------------------------------------------------

    _API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
    _API_ACTIONS = ("revision", "tree", "paths-info")

    def _api(self, method: str, segs: list[str], body: bytes) -> None:
        if not segs or segs[0] not in self._API_TYPES or len(segs) < 2:
            raise self._not_found()
        repo_type = self._API_TYPES[segs[0]]
        rest = segs[1:]
        # repo id is "ns/name" or "name": the action keyword tells where it ends.
        if len(rest) == 2 or (len(rest) >= 3 and rest[2] in self._API_ACTIONS):
            repo_ids, tail = ["/".join(unquote(s) for s in rest[:2])], rest[2:]
        elif len(rest) == 1 or rest[1] in self._API_ACTIONS:
            repo_ids, tail = [unquote(rest[0])], rest[1:]
        else:
            raise self._not_found()
        repo = self._repo(repo_type, repo_ids)
        head = method == "HEAD"

        if not tail and method in ("GET", "HEAD"):
            self._send_json(repo.info(self._commit(repo, "main"), **self._info_params()), head)
        elif tail[0] == "revision" and len(tail) == 2 and method in ("GET", "HEAD"):
            commit = self._commit(repo, unquote(tail[1]))
            self._send_json(repo.info(commit, **self._info_params()), head)
        elif tail[0] == "tree" and len(tail) >= 2 and method in ("GET", "HEAD"):
            commit = self._commit(repo, unquote(tail[1]))
            path = "/".join(unquote(s) for s in tail[2:])
            recursive = self.query.get("recursive", ["false"])[-1].lower() in ("1", "true")
            entries = repo.tree(path, recursive)
            if entries is None:
                raise _HubError(404, "EntryNotFound", f"{path} does not exist on \"{unquote(tail[1])}\"", commit)
            self._send_json(entries, head, {"X-Repo-Commit": commit})
        elif tail[0] == "paths-info" and len(tail) == 2 and method == "POST":
            commit = self._commit(repo, unquote(tail[1]))
            paths = self._posted_paths(body)
            infos = [info for p in paths if (info := repo.path_info(p)) is not None]
            self._send_json(infos, headers={"X-Repo-Commit": commit})
        else:
            raise self._not_found()

    def _info_params(self) -> dict:
        blobs = self.query.get("blobs", ["false"])[-1].lower() in ("1", "true")
        expand = self.query.get("expand") or self.query.get("expand[]")
        return {"blobs": blobs, "expand": expand}

    def _posted_paths(self, body: bytes) -> list[str]:
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body or b"{}").get("paths", [])
            return [paths] if isinstance(paths, str) else list(paths)
        return parse_qs(body.decode()).get("paths", [])

    # -- /resolve ------------------------------------------------------------------------------

    def _resolve(self, method: str, segs: list[str]) -> None:
        repo_type = "model"
        if segs[:1] in (["datasets"], ["spaces"]):
            repo_type, segs = segs[0][:-1], segs[1:]
        if method not in ("GET", "HEAD"):
            raise self._not_found()
        if len(segs) >= 5 and segs[2] == "resolve":
            repo_id, rest = "/".join(unquote(s) for s in segs[:2]), segs[3:]
        elif len(segs) >= 4 and segs[1] == "resolve":
            repo_id, rest = unquote(segs[0]), segs[2:]
        else:
            raise self._not_found()
        repo = self._repo(repo_type, [repo_id])
        revision = unquote(rest[0])
        commit = self._commit(repo, revision)
        path = "/".join(unquote(s) for s in rest[1:])
        f = repo.files.get(path)
        if f is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", commit)

        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
            if self.server.hub.lfs_redirect:
                headers["ETag"] = f'"{f.git_sha1}"'  # the Hub's ETag here is the pointer's blob id
                headers["Location"] = f"{self.server.hub.cdn_url}/lfs/{f.sha256}/{quote(f.path)}"
                self._send(302, headers, head=method == "HEAD")
                return
        headers["ETag"] = f'"{f.etag}"'
        self._send_file(method, f, headers)

    def _cdn(self, method: str, segs: list[str]) -> None:
        if method not in ("GET", "HEAD") or len(segs) < 2 or segs[0] != "lfs":
            raise self._not_found()
        sha256 = segs[1]
        for repo in self.server.hub._repos.values():
            for f in repo.files.values():
                if f.lfs and f.sha256 == sha256:
                    name = f.path.rsplit("/", 1)[-1]
                    self._send_file(method, f, {
                        "ETag": f'"{sha256}"',
                        "Accept-Ranges": "bytes",
                        "Content-Disposition": f'inline; filename="{name}"',
                    })
                    return
        raise _HubError(404, None, "NoSuchKey")

    def _send_file(self, method: str, f: HubFile, headers: dict[str, str]) -> None:
        hub = self.server.hub
        if method == "GET" and f.path in hub.fail:
            commit = headers.get("X-Repo-Commit")
            self._send_error(_HubError(hub.fail[f.path], None, f"Internal Error serving {f.path}", commit))
            return
        start, end, status = 0, f.size - 1, 200
        rng = self.headers.get("Range")
        if rng and method == "GET":
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), f.size - 1) if m.group(2) else f.size - 1
                else:  # suffix range: last N bytes
                    start = max(f.size - int(m.group(2)), 0)
                if start >= f.size or start > end:
                    self._send(416, {"Content-Range": f"bytes */{f.size}", **headers})
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length), **headers}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method == "HEAD":
            return
        stall_at = hub.stall.get(f.path)
        flip_at = f.size // 2 if f.path in hub.corrupt else None
        with open(f.local, "rb") as fh:
            fh.seek(start)
            offset, remaining = start, length
            while remaining > 0:
                n = min(_CHUNK, remaining)
                if stall_at is not None:
                    n = min(n, stall_at - offset)
                    if n <= 0:
                        self.wfile.flush()
                        self._stall()
                        return
                chunk = fh.read(n)
                if not chunk:
                    break
                if flip_at is not None and offset <= flip_at < offset + len(chunk):
                    data = bytearray(chunk)
                    data[flip_at - offset] ^= 0xFF
                    chunk = bytes(data)
                self.wfile.write(chunk)
                offset += len(chunk)
                remaining -= len(chunk)


class FakeHub:
    """Context manager running the fake Hub on 127.0.0.1 in a background thread.

    Failure modes (see the module docstring): `hang`, `stall`, `fail`, `corrupt`; a stalled or
    hanging request is released by `stop()` or after `max_stall` seconds.

    Attributes:
        url: "http://127.0.0.1:PORT", the value for HF_ENDPOINT.
        cdn_url: URL of the LFS "CDN" server (only started with lfs_redirect=True, else None).
        requests: (method, path) of every request received, in arrival order.
    """

    def __init__(
        self,
        repos: list[HubRepo],
        *,
        lfs_redirect: bool = False,
        hang: bool = False,
        stall: dict[str, int] | None = None,
        fail: dict[str, int] | None = None,
        corrupt: set[str] | list[str] | tuple[str, ...] = (),
        max_stall: float = 60.0,
    ) -> None:
        self._repos: dict[tuple[str, str], HubRepo] = {}
        for repo in repos:
            key = (repo.repo_type, repo.repo_id)
            if key in self._repos:
                raise ValueError(f"duplicate repo {repo.repo_type}:{repo.repo_id}")
            self._repos[key] = repo
        self.lfs_redirect = lfs_redirect
        self.hang = hang
        self.stall: dict[str, int] = dict(stall or {})
        self.fail: dict[str, int] = dict(fail or {})
        self.corrupt: set[str] = set(corrupt)
        self.max_stall = max_stall
        self._stopping = threading.Event()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self.url: str = ""
        self.cdn_url: str | None = None

    def _log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def repo(self, repo_id: str, repo_type: str = "model") -> HubRepo:
        return self._repos[(repo_type, repo_id)]

    def start(self) -> "FakeHub":
        if self._servers:
            raise RuntimeError("FakeHub already started")
        self._stopping.clear()
        self._servers.append(_Server(self, is_cdn=False))
        if self.lfs_redirect:
            self._servers.append(_Server(self, is_cdn=True))
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        if self.lfs_redirect:
            self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        """Stop serving; later connections are refused. `url` and `env()` keep working. Stalled
        or hanging requests are released (their connections dropped)."""
        self._stopping.set()
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, hf_home: Path | str) -> dict[str, str]:
        """Environment for a client subprocess: os.environ plus HF_ENDPOINT/HF_HOME pointing here.

        Sets HF_HUB_DISABLE_TELEMETRY=1; removes HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE,
        HF_HUB_DISABLE_PROGRESS_BARS, cache-location overrides (so the cache is under `hf_home`)
        and tokens (so requests are anonymous and deterministic); adds 127.0.0.1 to NO_PROXY.
        """
        if not self.url:
            raise RuntimeError("FakeHub not started")
        env = dict(os.environ)
        for var in (
            "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS",
            "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE",
            "HF_XET_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE",
            "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HUGGINGFACE_CO_STAGING",
        ):
            env.pop(var, None)
        no_proxy = ",".join(x for x in (env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1,localhost") if x)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            NO_PROXY=no_proxy,
            no_proxy=no_proxy,
        )
        return env
