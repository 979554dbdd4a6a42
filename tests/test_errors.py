"""Bad input: one line on stderr naming the problem, exit status 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import factories
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from statecast.cli import main


def run_bad(args, expect: str, code: int = 2):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expect in err, err
    return err


def copy_hf(hf_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "src"
    shutil.copytree(hf_dir, d)
    return d


def edit_weights(d: Path, fn) -> None:
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def assert_nothing_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    run_bad(["pull", str(tmp_path / "empty"), "--out", str(tmp_path / "out")], "is not a checkpoint")
    assert_nothing_written(tmp_path)


def test_neither_path_nor_repo_id(tmp_path):
    run_bad(["pull", "no such thing here", "--out", str(tmp_path / "out")], "neither an existing path nor a Hub repo id")


def test_unsupported_architecture_lists_supported(hf_dir, tmp_path):
    d = copy_hf(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    err = run_bad(["pull", str(d), "--out", str(tmp_path / "out")], "unsupported architecture 'bert'")
    assert "supported: rwkv" in err
    assert_nothing_written(tmp_path)


def test_missing_tensor_is_named(hf_dir, tmp_path):
    d = copy_hf(hf_dir, tmp_path)
    edit_weights(d, lambda sd: sd.pop("rwkv.blocks.1.attention.key.weight"))
    run_bad(["pull", str(d), "--out", str(tmp_path / "out")], "missing tensors rwkv.blocks.1.attention.key.weight")
    assert_nothing_written(tmp_path)


def test_unexpected_tensor_is_named(hf_dir, tmp_path):
    d = copy_hf(hf_dir, tmp_path)
    edit_weights(d, lambda sd: sd.__setitem__("rwkv.blocks.0.attention.mystery", torch.zeros(3)))
    run_bad(["pull", str(d), "--out", str(tmp_path / "out")], "unexpected tensors rwkv.blocks.0.attention.mystery")
    assert_nothing_written(tmp_path)


def test_extra_layer_is_unexpected(hf_dir, tmp_path):
    d = copy_hf(hf_dir, tmp_path)
    edit_weights(d, lambda sd: sd.__setitem__("rwkv.blocks.7.ln1.weight", torch.ones(32)))
    run_bad(["pull", str(d), "--out", str(tmp_path / "out")], "unexpected tensors rwkv.blocks.7.ln1.weight")


def test_mis_shaped_tensor_is_named(hf_dir, tmp_path):
    d = copy_hf(hf_dir, tmp_path)
    edit_weights(d, lambda sd: sd.__setitem__("rwkv.blocks.2.feed_forward.key.weight", torch.zeros(100, 32)))
    err = run_bad(["pull", str(d), "--out", str(tmp_path / "out")], "mis-shaped tensors")
    assert "rwkv.blocks.2.feed_forward.key.weight has shape (100, 32), expected (128, 32)" in err
    assert_nothing_written(tmp_path)


def test_truncated_safetensors(hf_dir, tmp_path):
    d = copy_hf(hf_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    run_bad(["pull", str(d), "--out", str(tmp_path / "out")], "truncated safetensors file")
    assert_nothing_written(tmp_path)


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = {"emb.weight": torch.zeros(4, 4), "payload": factories.CreatesFileWhenUnpickled(str(marker))}
    src = tmp_path / "evil"
    src.mkdir()
    with open(src / "model.pth", "wb") as f:
        pickle.dump(evil, f)  # a legacy-format pickle
    torch.save(evil, src / "zip.pth")  # and a zip-format torch checkpoint
    for name in ("model.pth", "zip.pth"):
        run_bad(["pull", str(src / name), "--out", str(tmp_path / "out")], "refusing to load")
        assert not marker.exists()
    assert_nothing_written(tmp_path)


def test_later_rwkv_generation_is_refused(tmp_path):
    sd = factories.native_rwkv4_state(n_layer=1, d=8, vocab=16)
    sd["blocks.0.att.ln_x.weight"] = torch.ones(8)
    torch.save(sd, tmp_path / "v5.pth")
    run_bad(["pull", str(tmp_path / "v5.pth"), "--out", str(tmp_path / "out")], "RWKV-5 native checkpoints are not supported")


def test_output_exists_needs_force(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run_bad(["pull", str(hf_dir), "--out", str(out)], "already exists (pass --force")
    run_bad(["pull", str(hf_dir), "--out", str(out), "--force"], "it is not a statecast output")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty directory, or a statecast output, is replaced
    for _ in range(2):
        result = CliRunner().invoke(main, ["pull", str(hf_dir), "--out", str(out), "--force", "--quiet"])
        assert result.exit_code == 0, result.output
        assert (out / "statecast.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["copy", "produce"])
def test_failure_midway_leaves_nothing(hf_dir, tmp_path, monkeypatch, where):
    """A tensor that fails to read or write after writing has started: the partial directory is removed."""
    from statecast.checkpoints import layout, readers

    calls = {"n": 0}
    target, name = (layout, "_pwrite_all") if where == "copy" else (readers.TensorSource, "get")
    real = getattr(target, name)

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk on fire")
        return real(*args)

    monkeypatch.setattr(target, name, flaky)
    from statecast.convert.pull import pull

    with pytest.raises(OSError):  # dtype=float16: every tensor is produced (cast), none copied
        pull(str(hf_dir), out=tmp_path / "out", progress=False, dtype=None if where == "copy" else "float16")
    assert_nothing_written(tmp_path)


def test_verify_and_generate_on_a_non_model(tmp_path):
    run_bad(["verify", str(tmp_path)], "is not a statecast model")
    run_bad(["generate", str(tmp_path / "nope"), "--prompt-ids", "1"], "no such model")


def test_bad_prompt_ids(pulled_hf):
    run_bad(["generate", str(pulled_hf), "--prompt-ids", "1,x"], "comma-separated integers")
    run_bad(["generate", str(pulled_hf), "--prompt-ids", "1,99999"], "out of range")


def test_revision_with_local_path(hf_dir, tmp_path):
    run_bad(["pull", str(hf_dir), "--revision", "v1", "--out", str(tmp_path / "out")], "--revision applies to Hub repos only")
