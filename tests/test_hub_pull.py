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
