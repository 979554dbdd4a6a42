"""Conversion into the unified layout: readers, name tables, manifest, dtype casts, round trip."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from statecast.checkpoints.layout import open_unified
from statecast.convert.pull import pull
from statecast.export import export_hf
from statecast.families.rwkv import HF, NATIVE

CANONICAL_LAYER = {
    "mixer_norm.weight", "mixer_norm.bias", "mlp_norm.weight", "mlp_norm.bias",
    "time_mix.decay", "time_mix.bonus", "time_mix.mix_k", "time_mix.mix_v", "time_mix.mix_r",
    "time_mix.key.weight", "time_mix.value.weight", "time_mix.receptance.weight", "time_mix.output.weight",
    "mlp.mix_k", "mlp.mix_r", "mlp.up.weight", "mlp.down.weight", "mlp.receptance.weight",
}
CANONICAL_TOP = {"embed.weight", "embed_norm.weight", "embed_norm.bias", "final_norm.weight", "final_norm.bias", "lm_head.weight"}


def _hf_state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    if (path / "pytorch_model.bin").is_file():
        out.update(torch.load(path / "pytorch_model.bin", weights_only=True))
    return out


def test_pull_local_hf_writes_canonical_layout(hf_dir, tmp_path):
    info = pull(str(hf_dir), out=tmp_path / "m", progress=False)
    assert info["family"] == "rwkv" and info["source_format"] == "rwkv-hf" and info["dtype"] == "float32"
    um = open_unified(info["path"])
    names = set(um.meta["tensors"])
    assert names == CANONICAL_TOP | {f"layers.{i}.{n}" for i in range(3) for n in CANONICAL_LAYER}
    assert info["n_params"] == sum(p.numel() for p in _hf_state(hf_dir).values())
    assert um.config["n_layer"] == 3 and um.config["d_model"] == 32 and um.config["layer_kinds"] == ["rwkv"] * 3
    # the manifest's digests are the tensors' bytes
    with safe_open(str(um.path / "model.safetensors"), "pt") as f:
        for name, entry in um.meta["tensors"].items():
            t = f.get_tensor(name)
            assert list(t.shape) == entry["shape"]
            assert hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest() == entry["sha256"]
    # provenance: source files hashed, tokenizer copied
    src = um.source
    assert src["kind"] == "local" and Path(src["path"]) == hf_dir
    # a local safetensors file's digest covers every byte in one pass (layout.py: sha256-tree)
    from statecast.checkpoints.layout import file_digest

    assert src["files"]["model.safetensors"] == file_digest(hf_dir / "model.safetensors")
    assert src["files"]["model.safetensors"].startswith("sha256-tree:")
    assert src["files"]["tokenizer.json"] == hashlib.sha256((hf_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert (um.path / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    # no temporary directories left next to the output
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_tensor_values_follow_the_table(hf_dir, pulled_hf):
    src = _hf_state(hf_dir)
    ours = open_unified(pulled_hf).state_dict()
    for name, t in ours.items():
        target = HF.from_canonical(name)
        key = target.source
        expected = src[key].reshape(-1) if target.transform == "squeeze_1_1_c" else src[key]
        assert torch.equal(t, expected), name


@pytest.mark.parametrize("fixture", ["hf_bin_dir", "hf_sharded_dir"])
def test_pull_bin_and_sharded_sources(fixture, request, tmp_path):
    src_dir = request.getfixturevalue(fixture)
    info = pull(str(src_dir), out=tmp_path / "m", progress=False)
    ours = open_unified(info["path"]).state_dict()
    src = _hf_state(src_dir)
    assert len(ours) == len(src)
    assert torch.equal(ours["lm_head.weight"], src["head.weight"])
    if fixture == "hf_sharded_dir":
        assert (src_dir / "model.safetensors.index.json").is_file()


def test_pull_native_pth(native_pth, tmp_path):
    info = pull(str(native_pth), out=tmp_path / "m", progress=False)
    assert info["source_format"] == "rwkv-native"
    um = open_unified(info["path"])
    sd = torch.load(native_pth, weights_only=True)
    ours = um.state_dict()
    for name, t in ours.items():
        key = NATIVE.from_canonical(name).source
        assert torch.equal(t.reshape(-1), sd[key].reshape(-1)), name
    assert um.meta["tokenizer"] == ["tokenizer.json"]  # 20B_tokenizer.json, renamed
    assert Path(um.source["path"]) == native_pth


def test_dtype_cast_keeps_wkv_parameters_in_float32(hf_dir, tmp_path):
    info = pull(str(hf_dir), out=tmp_path / "m", dtype="float16", progress=False)
    assert info["dtype"] == "float16"
    t = open_unified(info["path"]).meta["tensors"]
    assert t["layers.0.time_mix.decay"]["dtype"] == "float32"
    assert t["layers.0.time_mix.bonus"]["dtype"] == "float32"
    assert t["layers.0.time_mix.key.weight"]["dtype"] == "float16"
    assert t["embed.weight"]["dtype"] == "float16"


def test_sharded_output_is_readable(hf_dir, tmp_path):
    from statecast.convert.pull import Source, convert_local
    from statecast.families import detect

    det = detect(hf_dir)
    info = convert_local(det, Source(id=str(hf_dir), kind="local", path=hf_dir), tmp_path / "m", progress=False,
                         shard_bytes=40_000)
    um = open_unified(info["path"])
    assert len(um.meta["weights"]) > 1 and (um.path / "model.safetensors.index.json").is_file()
    index = json.loads((um.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(um.meta["tensors"])
    assert len(um.state_dict()) == len(um.meta["tensors"])


@pytest.mark.parametrize("fixture", ["hf_dir", "hf_bin_dir"])
def test_round_trip_hf_unified_hf_is_exact(fixture, request, tmp_path):
    src_dir = request.getfixturevalue(fixture)
    info = pull(str(src_dir), out=tmp_path / "m", progress=False)
    out = export_hf(info["path"], tmp_path / "back")["path"]
    a, b = _hf_state(src_dir), _hf_state(Path(out))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    cfg_a = json.loads((src_dir / "config.json").read_text())
    cfg_b = json.loads((Path(out) / "config.json").read_text())
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "layer_norm_epsilon",
                  "rescale_every", "context_length", "tie_word_embeddings", "model_type"):
        assert cfg_a.get(field) == cfg_b.get(field), field
    # and transformers loads the exported directory and computes the same logits
    from transformers import RwkvForCausalLM

    ids = torch.randint(0, cfg_a["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la = RwkvForCausalLM.from_pretrained(src_dir, rescale_every=0).eval()(ids).logits
        lb = RwkvForCausalLM.from_pretrained(out, rescale_every=0).eval()(ids).logits
    assert torch.equal(la, lb)


def test_native_exports_to_hf_that_transformers_runs(native_pth, tmp_path):
    from transformers import RwkvForCausalLM

    from statecast.convert.loading import load_model

    info = pull(str(native_pth), out=tmp_path / "m", progress=False)
    out = export_hf(info["path"], tmp_path / "hf")["path"]
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    model, _ = load_model(info["path"])
    with torch.no_grad():
        ref = RwkvForCausalLM.from_pretrained(out, rescale_every=0).eval()(ids).logits
        ours = model(ids)[0]
    assert (ours - ref).abs().max() < 1e-4


def test_in_memory_state_dict_mapping(hf_dir, pulled_hf):
    from transformers import RwkvForCausalLM

    from statecast.errors import StatecastError
    from statecast.families.tables import to_canonical_state

    sd = RwkvForCausalLM.from_pretrained(hf_dir).state_dict()
    ours = to_canonical_state(HF, sd)
    on_disk = open_unified(pulled_hf).state_dict()
    assert ours.keys() == on_disk.keys() and all(torch.equal(ours[k], on_disk[k]) for k in ours)
    with pytest.raises(StatecastError, match="unexpected tensors bogus"):
        to_canonical_state(HF, {**sd, "bogus": torch.zeros(1)})
