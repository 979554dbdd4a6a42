"""Tests of the fake Hub (tests/hubserver.py) against the real huggingface_hub client.

The client always runs in a subprocess: huggingface_hub reads HF_ENDPOINT at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

try:
    from tests.hubserver import FakeHub, HubRepo
except ImportError:  # tests/ not importable as a package: pytest put tests/ itself on sys.path
    from hubserver import FakeHub, HubRepo

REPO_ID = "statecast-test/tiny-model"
TAG = "v1.0"
TAG_SHA = hashlib.sha1(b"statecast-test tag v1.0").hexdigest()
# In-process HTTP client for raw checks; ignores any *_proxy environment variables.
_urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open
WANTED = ["config.json", "nested/extra.json", "model.safetensors", "tokenizer.json"]


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}, indent=2))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (root / "nested").mkdir()
    (root / "nested" / "extra.json").write_text('{"nested": true}\n')
    gen = torch.Generator().manual_seed(0)
    save_file({"weight": torch.randn(256, 1024, generator=gen)}, str(root / "model.safetensors"))  # ~1 MB
    torch.save({"weight": torch.zeros(4)}, root / "pytorch_model.bin")
    return root


@pytest.fixture
def hub(repo_dir):
    repo = HubRepo(REPO_ID, repo_dir, revisions={TAG: TAG_SHA, "dev": "main"})
    with FakeHub([repo]) as h:
        yield h


def run_client(code: str, env: dict[str, str]) -> dict:
    """Run `code` in a fresh interpreter; it must print one JSON object as its last stdout line."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"client failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


SNAPSHOT = """
    import json, os
    from huggingface_hub import snapshot_download
    path = snapshot_download({repo!r}, allow_patterns=["*.json", "*.safetensors"])
    files = sorted(
        os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/")
        for d, _, fs in os.walk(path) for f in fs
    )
    print(json.dumps({{"path": path, "files": files}}))
"""


def test_snapshot_download_allow_patterns(hub, repo_dir, tmp_path):
    repo = hub.repo(REPO_ID)
    out = run_client(SNAPSHOT.format(repo=REPO_ID), hub.env(tmp_path / "hf"))

    snap = Path(out["path"])
    assert snap.name == repo.sha and snap.parent.name == "snapshots"
    assert snap.is_relative_to(tmp_path / "hf" / "hub")
    assert out["files"] == sorted(WANTED)
    for name in WANTED:
        assert (snap / name).read_bytes() == (repo_dir / name).read_bytes(), name

    # Cache blobs are named by the ETag: sha256 for LFS files, git blob sha1 for small ones.
    weights = (repo_dir / "model.safetensors").read_bytes()
    config = (repo_dir / "config.json").read_bytes()
    assert os.path.basename(os.path.realpath(snap / "model.safetensors")) == hashlib.sha256(weights).hexdigest()
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    assert os.path.basename(os.path.realpath(snap / "config.json")) == git_sha1
    assert (tmp_path / "hf" / "hub" / "models--statecast-test--tiny-model" / "refs" / "main").read_text() == repo.sha

    paths = [p for _, p in hub.requests]
    assert ("GET", f"/api/models/{REPO_ID}/revision/main") in hub.requests
    assert ("GET", f"/api/models/{REPO_ID}/tree/{repo.sha}") in hub.requests
    assert ("GET", f"/{REPO_ID}/resolve/{repo.sha}/model.safetensors") in hub.requests
    assert not any("pytorch_model.bin" in p for p in paths), hub.requests


def test_offline_snapshot_served_from_cache(hub, tmp_path):
    env = hub.env(tmp_path / "hf")
    first = run_client(SNAPSHOT.format(repo=REPO_ID), env)
    n_requests = len(hub.requests)
    hub.stop()  # from here on the endpoint refuses connections

    second = run_client(SNAPSHOT.format(repo=REPO_ID), {**env, "HF_HUB_OFFLINE": "1"})
    assert second == first
    assert len(hub.requests) == n_requests


def test_model_info_and_tree(hub, repo_dir, tmp_path):
    repo = hub.repo(REPO_ID)
    out = run_client(
        f"""
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        info = api.model_info({REPO_ID!r}, files_metadata=True)
        tagged = api.model_info({REPO_ID!r}, revision={TAG!r})
        top = sorted((type(e).__name__, e.path) for e in api.list_repo_tree({REPO_ID!r}))
        lfs = {{s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs is not None}}
        print(json.dumps({{
            "id": info.id, "sha": info.sha, "tag_sha": tagged.sha, "lfs": lfs, "top": top,
            "siblings": sorted(s.rfilename for s in info.siblings),
        }}))
        """,
        hub.env(tmp_path / "hf"),
    )
    assert out["id"] == REPO_ID
    assert out["sha"] == repo.sha
    assert out["tag_sha"] == TAG_SHA
    assert out["siblings"] == sorted(WANTED + ["pytorch_model.bin"])
    assert out["lfs"] == {
        name: hashlib.sha256((repo_dir / name).read_bytes()).hexdigest()
        for name in ("model.safetensors", "pytorch_model.bin")
    }
    assert out["top"] == [
        ["RepoFile", "config.json"], ["RepoFile", "model.safetensors"], ["RepoFile", "pytorch_model.bin"],
        ["RepoFile", "tokenizer.json"], ["RepoFolder", "nested"],
    ]


def test_named_revisions(hub, repo_dir, tmp_path):
    repo = hub.repo(REPO_ID)
    out = run_client(
        f"""
        import json
        from huggingface_hub import hf_hub_download, snapshot_download
        tag = snapshot_download({REPO_ID!r}, revision={TAG!r}, allow_patterns=["*.safetensors"])
        dev = hf_hub_download({REPO_ID!r}, "config.json", revision="dev")
        by_sha = hf_hub_download({REPO_ID!r}, "nested/extra.json", revision={TAG_SHA!r})
        print(json.dumps({{"tag": tag, "dev": dev, "by_sha": by_sha}}))
        """,
        hub.env(tmp_path / "hf"),
    )
    tag = Path(out["tag"])
    assert tag.name == TAG_SHA
    assert (tag / "model.safetensors").read_bytes() == (repo_dir / "model.safetensors").read_bytes()
    assert Path(out["dev"]) == tag.parent / repo.sha / "config.json"
    assert Path(out["dev"]).read_bytes() == (repo_dir / "config.json").read_bytes()
    assert Path(out["by_sha"]) == tag / "nested" / "extra.json"
    assert Path(out["by_sha"]).read_bytes() == (repo_dir / "nested" / "extra.json").read_bytes()
    refs = tag.parent.parent / "refs"
    assert (refs / TAG).read_text() == TAG_SHA
    assert (refs / "dev").read_text() == repo.sha


def test_errors_map_to_client_exceptions(hub, tmp_path):
    out = run_client(
        f"""
        import json
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        calls = {{
            "snapshot_unknown_repo": lambda: snapshot_download("nobody/missing"),
            "info_unknown_repo": lambda: HfApi().model_info("nobody/missing"),
            "file_unknown_repo": lambda: hf_hub_download("nobody/missing", "config.json"),
            "snapshot_unknown_rev": lambda: snapshot_download({REPO_ID!r}, revision="no-such-branch"),
            "info_unknown_rev": lambda: HfApi().model_info({REPO_ID!r}, revision="no-such-branch"),
            "file_unknown_rev": lambda: hf_hub_download({REPO_ID!r}, "config.json", revision="no-such-branch"),
            "file_unknown_entry": lambda: hf_hub_download({REPO_ID!r}, "missing.json"),
        }}
        result = {{}}
        for name, call in calls.items():
            try:
                call()
                result[name] = None
            except Exception as e:
                result[name] = [c.__name__ for c in type(e).__mro__]
        print(json.dumps(result))
        """,
        hub.env(tmp_path / "hf"),
    )
    for name in ("snapshot_unknown_repo", "info_unknown_repo", "file_unknown_repo"):
        assert out[name][0] == "RepositoryNotFoundError", (name, out[name])
    for name in ("snapshot_unknown_rev", "info_unknown_rev", "file_unknown_rev"):
        assert out[name][0] == "RevisionNotFoundError", (name, out[name])
    assert "EntryNotFoundError" in out["file_unknown_entry"], out["file_unknown_entry"]


def test_lfs_redirect_to_cdn(repo_dir, tmp_path):
    with FakeHub([HubRepo(REPO_ID, repo_dir)], lfs_redirect=True) as hub:
        out = run_client(
            f"""
            import json
            from huggingface_hub import hf_hub_download
            print(json.dumps({{"path": hf_hub_download({REPO_ID!r}, "model.safetensors")}}))
            """,
            hub.env(tmp_path / "hf"),
        )
        sha256 = hub.repo(REPO_ID).files["model.safetensors"].sha256
        assert hub.cdn_url is not None and hub.cdn_url != hub.url
        assert ("GET", f"/lfs/{sha256}/model.safetensors") in hub.requests
        assert not any(m == "GET" and "/resolve/" in p for m, p in hub.requests), hub.requests
    path = Path(out["path"])
    assert path.read_bytes() == (repo_dir / "model.safetensors").read_bytes()
    assert os.path.basename(os.path.realpath(path)) == sha256


def test_http_headers_and_ranges(hub, repo_dir):
    repo = hub.repo(REPO_ID)
    weights = (repo_dir / "model.safetensors").read_bytes()
    url = f"{hub.url}/{REPO_ID}/resolve/main/model.safetensors"

    with _urlopen(urllib.request.Request(url, method="HEAD")) as r:
        assert r.status == 200
        assert r.headers["X-Repo-Commit"] == repo.sha
        assert r.headers["X-Linked-Etag"] == r.headers["ETag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
        assert r.headers["X-Linked-Size"] == r.headers["Content-Length"] == str(len(weights))
        assert r.read() == b""

    with _urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-"})) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 100-{len(weights) - 1}/{len(weights)}"
        assert r.read() == weights[100:]

    with pytest.raises(urllib.error.HTTPError) as exc:
        _urlopen(f"{hub.url}/{REPO_ID}/resolve/main/missing.json")
    assert exc.value.code == 404
    assert exc.value.headers["X-Error-Code"] == "EntryNotFound"
    assert exc.value.headers["X-Repo-Commit"] == repo.sha

    with pytest.raises(urllib.error.HTTPError) as exc:
        _urlopen(f"{hub.url}/api/models/nobody/missing")
    assert (exc.value.code, exc.value.headers["X-Error-Code"]) == (401, "RepoNotFound")

    assert ("HEAD", f"/{REPO_ID}/resolve/main/model.safetensors") == hub.requests[0]
    assert len(hub.requests) == 4


# --------------------------------------------------------------------------- failure modes


def _open(url: str, method: str = "GET", timeout: float = 5, **headers):
    return _urlopen(urllib.request.Request(url, method=method, headers=headers), timeout=timeout)


def test_hang_answers_nothing_until_stopped(repo_dir):
    import socket
    import time

    hub = FakeHub([HubRepo(REPO_ID, repo_dir)], hang=True).start()
    try:
        with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
            _open(f"{hub.url}/api/models/{REPO_ID}", timeout=0.5)
        assert hub.requests == [("GET", f"/api/models/{REPO_ID}")]
    finally:
        t0 = time.monotonic()
        hub.stop()
    assert time.monotonic() - t0 < 5  # the hanging handler was released


def test_stall_sends_a_prefix_then_nothing(hub, repo_dir):
    import socket

    weights = (repo_dir / "model.safetensors").read_bytes()
    hub.stall["model.safetensors"] = 1000
    url = f"{hub.url}/{REPO_ID}/resolve/main/model.safetensors"
    with _open(url, "HEAD") as r:  # metadata is not affected
        assert r.headers["Content-Length"] == str(len(weights))
    with _open(url, timeout=1) as r:
        assert r.headers["Content-Length"] == str(len(weights))
        assert r.read(1000) == weights[:1000]
        with pytest.raises((TimeoutError, socket.timeout)):
            r.read(1)
    with _open(url, timeout=1, Range="bytes=2000-") as r:  # a resume past the offset stalls at once
        assert r.status == 206
        with pytest.raises((TimeoutError, socket.timeout)):
            r.read(1)
    with _open(f"{hub.url}/{REPO_ID}/resolve/main/config.json") as r:  # other files are served
        assert r.read() == (repo_dir / "config.json").read_bytes()


def test_fail_answers_the_status_on_get_only(hub, repo_dir):
    repo = hub.repo(REPO_ID)
    hub.fail["model.safetensors"] = 500
    url = f"{hub.url}/{REPO_ID}/resolve/main/model.safetensors"
    with _open(url, "HEAD") as r:
        assert r.status == 200 and r.headers["X-Linked-Etag"] == f'"{repo.files["model.safetensors"].sha256}"'
    with pytest.raises(urllib.error.HTTPError) as exc:
        _open(url)
    assert exc.value.code == 500 and exc.value.headers["X-Repo-Commit"] == repo.sha


def test_corrupt_serves_other_bytes_under_the_right_etag(hub, repo_dir):
    weights = (repo_dir / "model.safetensors").read_bytes()
    sha256 = hashlib.sha256(weights).hexdigest()
    hub.corrupt.add("model.safetensors")
    url = f"{hub.url}/{REPO_ID}/resolve/main/model.safetensors"
    with _open(url) as r:
        assert r.headers["ETag"] == r.headers["X-Linked-Etag"] == f'"{sha256}"'
        body = r.read()
    assert len(body) == len(weights) and body != weights
    assert sum(a != b for a, b in zip(body, weights)) == 1
    with _open(url, Range=f"bytes={len(weights) // 2}-") as r:  # ranges see the same bytes
        assert r.read() == body[len(weights) // 2:]


def test_raw_names_list_hostile_paths(repo_dir, tmp_path):
    files = {"config.json": repo_dir / "config.json", "../../evil.safetensors": repo_dir / "model.safetensors",
             "/abs/evil.bin": repo_dir / "pytorch_model.bin"}
    with FakeHub([HubRepo(REPO_ID, files, raw_names=True)]) as hub:
        out = run_client(
            f"""
            import json
            from huggingface_hub import HfApi
            print(json.dumps(sorted(s.rfilename for s in HfApi().model_info({REPO_ID!r}).siblings)))
            """,
            hub.env(tmp_path / "hf"),
        )
    assert out == sorted(files)
    # without raw_names the names are tidied as before
    assert sorted(HubRepo(REPO_ID, {"/a/b.json": repo_dir / "config.json"}).files) == ["a/b.json"]
