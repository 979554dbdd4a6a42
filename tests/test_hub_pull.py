"""``convert pull ORG/NAME`` through a loopback server speaking the Hub API (real huggingface_hub client)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import FakeHub, HubRepo


def convert(args, env, check=True):
    r = subprocess.run([sys.executable, "-m", "statecast.cli", *args], env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture()
def hub_repo_dir(hf_dir, tmp_path):
    """The HF fixture plus a pytorch_model.bin copy that pull must not fetch (safetensors is preferred)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    d = tmp_path / "repo"
    shutil.copytree(hf_dir, d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "README.md").write_text("model card, not needed")
    return d


def test_pull_from_hub_api(hub_repo_dir, tmp_path):
    with FakeHub([HubRepo("acme/rwkv-tiny", hub_repo_dir, revisions={"v1": "main"})]) as hub:
        env = hub.env(tmp_path / "hf") | {"STATECAST_HOME": str(tmp_path / "store")}
        info = json.loads(convert(["pull", "acme/rwkv-tiny", "--json"], env).stdout)
        fetched = {p.rsplit("/", 1)[-1] for m, p in hub.requests if m == "GET" and "/resolve/" in p}
        assert fetched == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
        assert info["path"] == str(tmp_path / "store" / "models" / "acme--rwkv-tiny")
        assert info["source"] == "acme/rwkv-tiny" and info["revision"] == "main"
        assert info["sha"] == hub.repo("acme/rwkv-tiny").sha
        assert info["family"] == "rwkv" and info["n_params"] > 0 and info["dtype"] == "float32"

        # provenance: the LFS blob's sha256 (from the HF cache) is the file's sha256
        meta = json.loads(Path(info["path"], "statecast.json").read_text())
        assert meta["source"]["files"]["model.safetensors"] == hashlib.sha256((hub_repo_dir / "model.safetensors").read_bytes()).hexdigest()

        # pulling the same commit again reuses the store entry; nothing is re-downloaded
        n_before = len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]])
        again = json.loads(convert(["pull", "acme/rwkv-tiny", "--json"], env).stdout)
        assert again == info
        assert n_before == len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]])

        # a named revision goes to its own store entry
        info_v1 = json.loads(convert(["pull", "acme/rwkv-tiny", "--revision", "v1", "--json"], env).stdout)
        assert info_v1["path"].endswith("acme--rwkv-tiny@v1")

        # bad repo / revision: one line, exit 2
        r = convert(["pull", "acme/nope"], env, check=False)
        assert r.returncode == 2 and r.stderr.strip() == "error: unknown Hub repo 'acme/nope' (or it is private or gated: log in with `hf auth login`)"
        r = convert(["pull", "acme/rwkv-tiny", "--revision", "nope"], env, check=False)
        assert r.returncode == 2 and "unknown revision 'nope'" in r.stderr and "Traceback" not in r.stderr

        # list sees what was pulled
        listed = json.loads(convert(["list", "--json"], env).stdout)
        assert {m["name"] for m in listed} == {"acme--rwkv-tiny", "acme--rwkv-tiny@v1"}
        n_requests = len(hub.requests)

    # offline, from the HF cache: no server at all
    env_off = env | {"HF_HUB_OFFLINE": "1"}
    info_off = json.loads(convert(["pull", "acme/rwkv-tiny", "--out", str(tmp_path / "offline"), "--json"], env_off).stdout)
    assert info_off["sha"] == info["sha"]
    assert n_requests == len(hub.requests)
    r = convert(["pull", "acme/other", "--out", str(tmp_path / "x")], env_off, check=False)
    assert r.returncode == 2 and "not in the Hugging Face cache" in r.stderr


def test_pull_sharded_llama_from_hub_api_then_verify(tmp_path):
    """A sharded safetensors Llama (GQA) repo: the index and every shard come down, nothing else."""
    import factories

    src = factories.hf_transformer(tmp_path / "repo", "llama", shard="20KB", seed=9)
    n_shards = len(list(src.glob("model-*.safetensors")))
    with FakeHub([HubRepo("acme/llama-tiny", src)]) as hub:
        env = hub.env(tmp_path / "hf") | {"STATECAST_HOME": str(tmp_path / "store")}
        info = json.loads(convert(["pull", "acme/llama-tiny", "--json"], env).stdout)
        fetched = {p.rsplit("/", 1)[-1] for m, p in hub.requests if m == "GET" and "/resolve/" in p}
    assert info["family"] == "transformer" and info["source_format"] == "llama-hf"
    assert {f for f in fetched if f.startswith("model")} == {"model.safetensors.index.json"} | {
        p.name for p in src.glob("model-*.safetensors")}
    assert n_shards > 1
    # verify runs from the HF cache snapshot the pull recorded, with the server gone
    r = convert(["verify", "acme/llama-tiny", "--json"], env | {"HF_HUB_OFFLINE": "1"})
    assert json.loads(r.stdout)["passed"]


def test_pull_jamba_as_on_the_hub_then_verify(tmp_path):
    """`convert pull ai21labs/Jamba-tiny-dev` in miniature: a bfloat16, sharded Jamba repo with
    one tensor per expert, served under that repo id; verify compares in float32 and says so."""
    import factories
    import torch

    src = factories.hf_jamba(tmp_path / "repo", seed=12, dtype=torch.bfloat16, shard="40KB")
    with FakeHub([HubRepo("ai21labs/Jamba-tiny-dev", src)]) as hub:
        env = hub.env(tmp_path / "hf") | {"STATECAST_HOME": str(tmp_path / "store")}
        info = json.loads(convert(["pull", "ai21labs/Jamba-tiny-dev", "--json"], env).stdout)
    assert info["family"] == "jamba" and info["source_format"] == "jamba-hf" and info["dtype"] == "bfloat16"
    r = convert(["verify", "ai21labs/Jamba-tiny-dev", "--json"], env | {"HF_HUB_OFFLINE": "1"})
    report = json.loads(r.stdout)
    assert report["passed"] and report["dtype"] == "float32" and report["checkpoint_dtype"] == "bfloat16"
    assert report["reference"]["dtype"] == "float32"


# --------------------------------------------------------------------------- a broken or hostile Hub
# Each: `pull --quiet` against a fake Hub in a failure mode; one line on stderr, exit 2, nothing
# in the output location (and no hidden partial directory beside it).


def pull_fails(hub, repo_id: str, tmp_path: Path, timeout: str = "1") -> str:
    env = hub.env(tmp_path / "hf") | {"STATECAST_HOME": str(tmp_path / "store"), "STATECAST_HUB_TIMEOUT": timeout}
    return _pull_fails(env, repo_id, tmp_path)


def _pull_fails(env: dict, repo_id: str, tmp_path: Path) -> str:
    import time

    out = tmp_path / "out"
    t0 = time.monotonic()
    r = convert(["pull", repo_id, "--out", str(out), "--quiet"], env, check=False)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert time.monotonic() - t0 < 120
    return lines[0]


def test_hub_that_never_answers_times_out(hf_dir, tmp_path):
    with FakeHub([HubRepo("acme/rwkv-tiny", hf_dir)], hang=True) as hub:
        err = pull_fails(hub, "acme/rwkv-tiny", tmp_path)
    assert err.startswith(f"error: the Hub at {hub.url} sent nothing for 1 s while listing acme/rwkv-tiny@main"), err
    assert "STATECAST_HUB_TIMEOUT=1" in err


def test_hub_stalling_mid_file_times_out(hf_dir, tmp_path):
    """huggingface_hub resumes a stalled download a few times (each waits the timeout), then gives up."""
    size = (hf_dir / "model.safetensors").stat().st_size
    with FakeHub([HubRepo("acme/rwkv-tiny", hf_dir)], stall={"model.safetensors": size // 2}) as hub:
        err = pull_fails(hub, "acme/rwkv-tiny", tmp_path)
        gets = [p for m, p in hub.requests if m == "GET" and p.endswith("/model.safetensors")]
    assert err == (f"error: the Hub at {hub.url} sent nothing for 1 s while downloading model.safetensors of "
                   "acme/rwkv-tiny@main; giving up (STATECAST_HUB_TIMEOUT=1: raise it to wait longer)"), err
    assert len(gets) > 1  # resumed, then abandoned
    blobs = tmp_path / "hf" / "hub" / "models--acme--rwkv-tiny" / "blobs"
    assert not [p for p in blobs.iterdir() if p.name.endswith(".incomplete")]


def test_bad_timeout_setting(hf_dir, tmp_path):
    with FakeHub([HubRepo("acme/rwkv-tiny", hf_dir)]) as hub:
        for bad in ("0", "-3", "soon", "nan", "inf"):
            err = pull_fails(hub, "acme/rwkv-tiny", tmp_path, timeout=bad)
            assert err == f"error: STATECAST_HUB_TIMEOUT must be a number of seconds > 0, got {bad!r}", err
        assert hub.requests == []


def test_bytes_not_matching_the_hub_sha256_are_refused_and_dropped(hf_dir, tmp_path):
    sha = hashlib.sha256((hf_dir / "model.safetensors").read_bytes()).hexdigest()
    with FakeHub([HubRepo("acme/rwkv-tiny", hf_dir)], corrupt={"model.safetensors"}) as hub:
        err = pull_fails(hub, "acme/rwkv-tiny", tmp_path)
        assert err.startswith("error: acme/rwkv-tiny@main: the downloaded model.safetensors does not match the sha256 "
                              f"the Hub lists for it (expected {sha}, got "), err
        assert err.endswith("removed it from the cache, pull again to download it")
        repo_cache = tmp_path / "hf" / "hub" / "models--acme--rwkv-tiny"
        assert not (repo_cache / "blobs" / sha).exists()  # not kept under the name of the right bytes
        assert not list(repo_cache.glob("snapshots/*/model.safetensors"))
        # the server is fixed: the retry downloads the file again and succeeds
        hub.corrupt.clear()
        env = hub.env(tmp_path / "hf") | {"STATECAST_HOME": str(tmp_path / "store")}
        info = json.loads(convert(["pull", "acme/rwkv-tiny", "--out", str(tmp_path / "out"), "--json"], env).stdout)
    meta = json.loads(Path(info["path"], "statecast.json").read_text())
    assert meta["source"]["files"]["model.safetensors"] == sha
    assert (repo_cache / "blobs" / sha).read_bytes() == (hf_dir / "model.safetensors").read_bytes()


def test_a_corrupt_blob_in_the_cache_is_refused_offline(hf_dir, tmp_path):
    """A cache blob is named by its sha256: the offline pull checks the bytes against the name."""
    with FakeHub([HubRepo("acme/rwkv-tiny", hf_dir)]) as hub:
        env = hub.env(tmp_path / "hf") | {"STATECAST_HOME": str(tmp_path / "store")}
        convert(["pull", "acme/rwkv-tiny", "--out", str(tmp_path / "first"), "--quiet"], env)
    sha = hashlib.sha256((hf_dir / "model.safetensors").read_bytes()).hexdigest()
    blob = tmp_path / "hf" / "hub" / "models--acme--rwkv-tiny" / "blobs" / sha
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    err = _pull_fails(env | {"HF_HUB_OFFLINE": "1"}, "acme/rwkv-tiny", tmp_path)
    assert "the downloaded model.safetensors does not match the sha256" in err, err
    assert not blob.exists()


def test_http_500_on_a_download_is_reported_as_such(hf_dir, tmp_path):
    with FakeHub([HubRepo("acme/rwkv-tiny", hf_dir)], fail={"model.safetensors": 500}) as hub:
        err = pull_fails(hub, "acme/rwkv-tiny", tmp_path)
    assert err == (f"error: HTTP 500 Internal Server Error from the Hub at {hub.url} while downloading "
                   "model.safetensors of acme/rwkv-tiny@main"), err


def test_refused_connection(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub = FakeHub([])
    hub.url = f"http://127.0.0.1:{port}"
    err = _pull_fails(hub.env(tmp_path / "hf") | {"STATECAST_HUB_TIMEOUT": "5"}, "acme/rwkv-tiny", tmp_path)
    assert err.startswith(f"error: cannot reach the Hub at http://127.0.0.1:{port} for acme/rwkv-tiny@main: "), err


@pytest.mark.parametrize("name", ["../../evil.safetensors", "/tmp/statecast-evil/evil.safetensors", "a/../../evil.bin"])
def test_listing_with_names_outside_the_repo_is_refused_before_downloading(hf_dir, tmp_path, name):
    files = {p.name: p for p in hf_dir.iterdir()} | {name: hf_dir / "model.safetensors"}
    with FakeHub([HubRepo("acme/evil", files, raw_names=True)]) as hub:
        err = pull_fails(hub, "acme/evil", tmp_path)
        assert not [p for m, p in hub.requests if "/resolve/" in p]
    assert err == (f"error: Hub repo acme/evil@main lists a file outside the repo, {name!r} (an absolute path or one "
                   "with '..'); refusing to download from it"), err
    assert not (tmp_path / "hf" / "hub" / "models--acme--evil" / "blobs").exists()
    assert not Path("/tmp/statecast-evil").exists()


def test_hub_errors_found_through_the_cause_chain():
    """huggingface_hub wraps an HTTP error of a metadata call into a "not in the local cache" error
    (after its retries): the status is still what is reported."""
    import httpx2
    from huggingface_hub import errors as he

    from statecast.checkpoints.hub import hub_error

    request = httpx2.Request("HEAD", "https://hub.test/acme/x/resolve/abc/config.json")
    response = httpx2.Response(503, request=request)
    try:
        try:
            raise he.HfHubHTTPError("503 Server Error", response=response)
        except he.HfHubHTTPError as inner:
            raise he.LocalEntryNotFoundError("An error happened while trying to locate the file") from inner
    except he.LocalEntryNotFoundError as e:
        err = hub_error(e, "acme/x", "main", 60)
    assert "HTTP 503 Service Unavailable from the Hub at" in str(err) and "while downloading config.json of acme/x@main" in str(err)
    assert hub_error(ValueError("something else"), "acme/x", "main", 60) is None
