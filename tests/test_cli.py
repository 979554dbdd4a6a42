"""The CLI: every command through click's CliRunner, and the whole chain once in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from statecast.cli import main


def invoke(*args):
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def test_inspect_source_and_unified(hf_dir, pulled_hf):
    src = json.loads(invoke("inspect", str(hf_dir), "--json").stdout)
    assert src["kind"] == "source" and src["format"] == "rwkv-hf" and "tokenizer.json" in src["tokenizer"]
    uni = json.loads(invoke("inspect", str(pulled_hf), "--json").stdout)
    assert uni["kind"] == "unified" and uni["n_params"] == src["n_params"] and uni["config"]["n_layer"] == 3
    assert "rwkv-hf" in invoke("inspect", str(pulled_hf)).stdout


def test_generate_json_greedy_matches_transformers(hf_dir, pulled_hf):
    from transformers import RwkvForCausalLM

    out = json.loads(invoke("generate", str(pulled_hf), "--prompt-ids", "5,6,7", "--max-new-tokens", "12", "--json").stdout)
    assert out["prompt_ids"] == [5, 6, 7] and len(out["new_ids"]) == 12
    ref = RwkvForCausalLM.from_pretrained(hf_dir, rescale_every=0).eval()
    import torch

    expected = ref.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 3:].tolist()
    assert out["new_ids"] == expected


def test_generate_text_and_seeded_sampling(pulled_hf):
    r = invoke("generate", str(pulled_hf), "--prompt", "The quick brown", "--max-new-tokens", "8", "--json")
    out = json.loads(r.stdout)
    assert out["text"] and len(out["new_ids"]) == 8
    a = invoke("generate", str(pulled_hf), "--prompt-ids", "1,2", "--temperature", "1.0", "--top-p", "0.9", "--seed", "3", "--json")
    b = invoke("generate", str(pulled_hf), "--prompt-ids", "1,2", "--temperature", "1.0", "--top-p", "0.9", "--seed", "3", "--json")
    assert json.loads(a.stdout)["new_ids"] == json.loads(b.stdout)["new_ids"]
    streamed = invoke("generate", str(pulled_hf), "--prompt", "The quick", "--max-new-tokens", "4").stdout
    assert streamed.startswith("The quick")


def test_export_hf_and_list(pulled_hf, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(pulled_hf, model)
    info = json.loads(invoke("export", str(model), "--format", "hf", "--out", str(tmp_path / "hf"), "--json").stdout)
    assert Path(info["path"], "config.json").is_file() and info["n_tensors"] > 0
    r = CliRunner().invoke(main, ["export", str(model), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert json.loads(invoke("list", "--json").stdout) == []


def test_end_to_end_in_a_subprocess(hf_dir, tmp_path):
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("convert")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "statecast.cli"]
    env = dict(os.environ, STATECAST_HOME=str(tmp_path / "home"))

    def run(*args):
        r = subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    path = json.loads(run("pull", str(hf_dir), "--json"))["path"]
    assert path == str(tmp_path / "home" / "models" / "rwkv-tiny")
    report = json.loads(run("verify", "rwkv-tiny", "--device", "cpu", "--json"))
    assert report["passed"]
    gen = json.loads(run("generate", "rwkv-tiny", "--prompt", "The quick", "--max-new-tokens", "5", "--json"))
    assert len(gen["new_ids"]) == 5
    run("export", path, "--format", "hf")
    assert Path(path, "hf", "model.safetensors").is_file()
    listed = json.loads(run("list", "--json"))
    assert listed[0]["name"] == "rwkv-tiny" and listed[0]["verified"] is True
    assert "PASS" in run("verify", path, "--device", "cpu")


def test_demo_runs_offline(tmp_path):
    env = dict(os.environ, STATECAST_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "statecast.cli", "demo"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from statecast.families import FAMILIES

    n = len(FAMILIES)  # every registered family's demo
    assert r.stdout.count("# Parity report: PASS") == n and "FAIL" not in r.stdout
    for family in FAMILIES:
        assert f"/{n} {family}:" in r.stdout
    assert r.stdout.count("--format onnx ->") == n and r.stdout.count("-> same ids as PyTorch") == n
    assert "convert generate demo-llama" in r.stdout


def test_demo_one_family_and_unknown_family(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from statecast.cli import main

    monkeypatch.setenv("STATECAST_HOME", str(tmp_path / "home"))
    r = CliRunner().invoke(main, ["demo", "--family", "transformer"])
    assert r.exit_code == 0, r.output
    assert "1/1 transformer" in r.output and r.output.count("# Parity report: PASS") == 1
    from statecast.families import FAMILIES

    assert list(next(p for p in main.commands["demo"].params if p.name == "families").type.choices) == list(FAMILIES)
    r = CliRunner().invoke(main, ["demo", "--family", "griffin"])
    assert r.exit_code == 2 and "Invalid value for '--family'" in r.output
