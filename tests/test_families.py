"""Mamba, Transformer and Jamba sources end to end: pull, verify against transformers, greedy
agreement with transformers' ``generate``, and the exact round trip back to Hub format.

One tiny checkpoint per supported source format, made by transformers' own classes
(and a state-spaces-format Mamba written as ``mamba_ssm`` writes it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import factories
import pytest
import torch

from statecast.checkpoints.layout import open_unified
from statecast.checkpoints.readers import open_tensors, weight_files
from statecast.convert.pull import pull
from statecast.errors import StatecastError
from statecast.export import export
from statecast.families import make_reference
from statecast.parity.verify import verify

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# name: (builder, family, recorded source format, transformers class)
SOURCES = {
    "mamba": (lambda p: factories.hf_mamba(p), "mamba", "mamba-hf", "MambaForCausalLM"),
    "mamba-untied-bin": (lambda p: factories.hf_mamba(p, fmt="bin", tied=False, seed=1), "mamba", "mamba-hf",
                         "MambaForCausalLM"),
    "falcon-mamba": (lambda p: factories.hf_mamba(p, falcon=True, seed=2), "mamba", "falcon-mamba-hf",
                     "FalconMambaForCausalLM"),
    "mamba-native": (lambda p: factories.native_mamba(p), "mamba", "mamba-native", "MambaForCausalLM"),
    "gpt2": (lambda p: factories.hf_transformer(p, "gpt2", tied=True, heads=4), "transformer", "gpt2-hf",
             "GPT2LMHeadModel"),
    "gpt2-bare": (lambda p: factories.gpt2_bare(p), "transformer", "gpt2-hf-bare", "GPT2LMHeadModel"),
    "llama-gqa-sharded": (lambda p: factories.hf_transformer(p, "llama", seed=5, shard="20KB",
                                                             rope_parameters=LLAMA3_ROPE),
                          "transformer", "llama-hf", "LlamaForCausalLM"),
    "llama-tied-bf16": (lambda p: factories.hf_transformer(p, "llama", seed=6, tied=True, dtype=torch.bfloat16,
                                                           head_dim=16),
                        "transformer", "llama-hf", "LlamaForCausalLM"),
    "mistral-window": (lambda p: factories.hf_transformer(p, "mistral", seed=7, sliding_window=16),
                       "transformer", "mistral-hf", "MistralForCausalLM"),
    "qwen2": (lambda p: factories.hf_transformer(p, "qwen2", seed=8, tied=True), "transformer", "qwen2-hf",
              "Qwen2ForCausalLM"),
    # Jamba: attention on layers 1 and 4 of 6, experts on even layers, top-2, sharded (float32)
    "jamba-p3o1-top2-sharded": (lambda p: factories.hf_jamba(p, seed=9, layers=6, attn_period=3, attn_offset=1,
                                                             expert_period=2, expert_offset=0, top_k=2, shard="40KB"),
                                "jamba", "jamba-hf", "JambaForCausalLM"),
    # attention on even layers, experts on odd layers, top-1 routing, bfloat16 as Jamba ships
    "jamba-p2o0-top1-bf16": (lambda p: factories.hf_jamba(p, seed=10, layers=4, attn_period=2, attn_offset=0,
                                                          top_k=1, experts=3, dtype=torch.bfloat16),
                             "jamba", "jamba-hf", "JambaForCausalLM"),
    # Mamba-2: 2 groups of 4 heads, chunk 16 (verify's prompts span several chunks, the last one partial)
    "mamba2-groups": (lambda p: factories.hf_mamba2(p, seed=13), "mamba2", "mamba2-hf", "Mamba2ForCausalLM"),
    "mamba2-native": (lambda p: factories.native_mamba2(p), "mamba2", "mamba2-native", "Mamba2ForCausalLM"),
    "mamba2-tied-bf16": (lambda p: factories.hf_mamba2(p, seed=14, tied=True, groups=1, chunk=32, dtype=torch.bfloat16),
                         "mamba2", "mamba2-hf", "Mamba2ForCausalLM"),
    # Zamba: hybrid layers 2 and 4 of 6 run the one shared block (tied head: transformers ties the block too)
    "zamba-tied": (lambda p: factories.hf_zamba(p, seed=21), "zamba", "zamba-hf", "ZambaForCausalLM"),
    # untied head, so a block per hybrid layer (2 and 4 of 7), 4 Mamba heads, bfloat16
    "zamba-untied-bf16": (lambda p: factories.hf_zamba(p, seed=22, layers=7, attn_period=3, attn_offset=1, mamba_heads=4,
                                                       tied=False, dtype=torch.bfloat16),
                          "zamba", "zamba-hf", "ZambaForCausalLM"),
    # Zamba2: two shared blocks in turn at layers 1, 3, 5 (block 0 twice), LoRA adapters, rope, chunk 16
    "zamba2-blocks-adapters": (lambda p: factories.hf_zamba2(p, seed=23), "zamba2", "zamba2-hf", "Zamba2ForCausalLM"),
    # one block at layers 2 and 4, no attention adapters (the MLP's are always there), no rope, 1 group, bfloat16
    "zamba2-1block-bf16": (lambda p: factories.hf_zamba2(p, seed=24, layers=5, hybrid=(2, 4), blocks=1, groups=1,
                                                         attn_adapters=False, rope=False, dtype=torch.bfloat16),
                           "zamba2", "zamba2-hf", "Zamba2ForCausalLM"),
}

# state-spaces native sources: exported and referenced as transformers' class, embedding renamed
NATIVE_STATE_SPACES = ("mamba-native", "mamba2-native")

# per-layer kinds each source must record: (layer_kinds, ffn_kinds); default: one kind throughout
KINDS = {
    "jamba-p3o1-top2-sharded": (["mamba", "attention", "mamba"] * 2, ["moe", "mlp"] * 3),
    "jamba-p2o0-top1-bf16": (["attention", "mamba"] * 2, ["mlp", "moe"] * 2),
    **{name: (["mamba2"] * 3, None) for name in ("mamba2-groups", "mamba2-native", "mamba2-tied-bf16")},
    "zamba-tied": (["mamba", "mamba", "hybrid", "mamba", "hybrid", "mamba"], None),
    "zamba-untied-bf16": (["mamba", "mamba", "hybrid", "mamba", "hybrid", "mamba", "mamba"], None),
    "zamba2-blocks-adapters": (["mamba2", "hybrid"] * 3, None),
    "zamba2-1block-bf16": (["mamba2", "mamba2", "hybrid", "mamba2", "hybrid"], None),
}


@pytest.fixture(scope="session", params=list(SOURCES))
def converted(request, tmp_path_factory):
    """(name, source dir, unified dir, verify report) per source, made once per session."""
    name = request.param
    build, *_ = SOURCES[name]
    root = tmp_path_factory.mktemp(name)
    src = build(root / "src")
    info = pull(str(src), out=root / "unified", progress=False)
    report = verify(info["path"], device="cpu", raise_on_fail=False)
    return name, src, Path(info["path"]), report


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_tensors(weight_files(path)) as src:
        return {k: src.get(k).clone() for k in src.keys()}


def test_pull_records_family_format_and_provenance(converted):
    name, src, path, _ = converted
    _, family, fmt, _ = SOURCES[name]
    um = open_unified(path)
    assert um.family == family and um.source["format"] == fmt
    n = um.config["n_layer"]
    kinds, ffn = KINDS.get(name, ([{"mamba": "mamba", "transformer": "attention"}.get(family)] * n, None))
    assert um.config["layer_kinds"] == kinds and um.config.get("ffn_kinds") == ffn
    assert set(um.source["files"]) >= {f.name for f in weight_files(src)}
    assert (path / "tokenizer.json").is_file()
    if name in ("llama-tied-bf16", "jamba-p2o0-top1-bf16", "mamba2-tied-bf16", "zamba-untied-bf16",
                "zamba2-1block-bf16"):
        assert um.meta["dtype"] == "bfloat16" and um.source["dtype"] == "bfloat16"
    if name == "mamba-native":
        assert um.config["vocab_size"] == 304  # the padded embedding, not config.json's 300


def test_verify_passes_against_transformers(converted):
    name, _, path, r = converted
    _, _, _, cls = SOURCES[name]
    assert r["passed"], (r["checks"], r["first_divergent_layer"])
    assert r["reference"]["implementation"] == f"transformers.{cls}"
    assert r["dtype"] == "float32"  # a bfloat16 source is compared upcast, exactly
    # nmse_db None: identical logits ("exact" in parity.md; parity/metrics.py)
    assert r["max_abs_diff"] < 1e-3 and (r["nmse_db"] or -math.inf) < -90 and r["top1_agreement"] == 1.0
    if r["nmse_db"] is None:
        assert r["max_abs_diff"] == 0 and "| nmse_db | exact |" in (path / "parity.md").read_text()
    assert r["step_vs_parallel_max_abs_diff"] < 1e-3
    assert len(r["per_layer"]) == open_unified(path).config["n_layer"] and r["first_divergent_layer"] is None
    # greedy ids identical to transformers' greedy generate on the same checkpoint, float32
    assert r["greedy"]["ours"] == r["greedy"]["reference"] and len(r["greedy"]["ours"]) == 32
    if name in NATIVE_STATE_SPACES:
        assert "renamed backbone.embedding.weight -> backbone.embeddings.weight" in r["reference"]["weights"]
    assert json.loads((path / "parity.json").read_text())["passed"]


def test_round_trip_to_hub_format_is_exact(converted, tmp_path):
    name, src, path, _ = converted
    *_, cls = SOURCES[name]
    out = export(path, "hf", tmp_path / "hf")
    assert out["architecture"] == cls
    back, orig = _tensors(Path(out["path"])), _tensors(src)
    cfg = json.loads((src / "config.json").read_text())
    tied = cfg.get("tie_word_embeddings", cfg.get("tie_embeddings", True))
    if tied:  # a tied head saved as its own key is not written again
        orig.pop("lm_head.weight", None)
    if name in NATIVE_STATE_SPACES:  # exported as transformers' MambaForCausalLM / Mamba2ForCausalLM
        orig["backbone.embeddings.weight"] = orig.pop("backbone.embedding.weight")
    assert back.keys() == orig.keys()
    for k, t in orig.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k

    # and transformers loads the export to the same logits as the original
    import transformers

    ids = torch.randint(0, open_unified(path).config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    ref_cls = getattr(transformers, cls)
    exported = ref_cls.from_pretrained(out["path"], dtype=torch.float32).eval()
    with torch.no_grad():
        if name in NATIVE_STATE_SPACES:  # no transformers loader: the native tensors as verify's reference holds them
            um = open_unified(path)
            original = make_reference(um.source["format"], src, torch.device("cpu"), um.config).model
        else:
            original = ref_cls.from_pretrained(src, dtype=torch.float32).eval()
        assert torch.equal(exported(ids).logits, original(ids).logits)


def test_generate_prefill_then_steps_matches_verify_greedy(converted):
    from statecast.convert.generate import generate

    _, _, path, r = converted
    prompt = r["greedy"]["prompt"]
    # in the dtype verify computed in (a bfloat16 checkpoint generates in bfloat16 by default)
    out = generate(path, prompt_ids=",".join(map(str, prompt)), max_new_tokens=8, dtype=r["dtype"])
    assert out["new_ids"] == r["greedy"]["reference"][:8]


def test_pull_refuses_bad_mamba_and_transformer_sources(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = factories.hf_transformer(tmp_path / "llama", "llama")
    # a mis-shaped tensor is named
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.self_attn.k_proj.weight"] = sd["model.layers.1.self_attn.k_proj.weight"][:8]
    sd.pop("model.layers.2.mlp.up_proj.weight")
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(StatecastError, match="missing tensors model.layers.2.mlp.up_proj.weight"):
        pull(str(bad), out=tmp_path / "o1", progress=False)
    sd["model.layers.2.mlp.up_proj.weight"] = torch.zeros(96, 32)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(StatecastError, match=r"k_proj.weight has shape \(8, 32\), expected \(16, 32\)"):
        pull(str(bad), out=tmp_path / "o2", progress=False)
    # an unsupported rope type is refused by name
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StatecastError, match="rope type 'yarn' is not supported"):
        pull(str(src), out=tmp_path / "o3", progress=False)
    # a Mamba-2 state-spaces checkpoint is refused by name
    native = factories.native_mamba(tmp_path / "native")
    cfg = json.loads((native / "config.json").read_text())
    cfg["ssm_cfg"] = {"layer": "Mamba2"}
    (native / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StatecastError, match="ssm_cfg.layer 'Mamba2' but the mixers hold no mixer.dt_bias"):
        pull(str(native), out=tmp_path / "o4", progress=False)
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_compiled_kernels_are_the_default_where_they_run(tmp_path, pulled_hf, monkeypatch):
    """By default (`--kernels auto`) Mamba runs its C++ scan where it builds and passes its
    self-check (the test machine has the C++ toolchain, as CI does) and still passes verify,
    and parity.json says so; where it cannot, the default is the pure path and the report
    says why. `--kernels compiled` on a family without compiled kernels, or on a machine
    where the kernel does not build, is a one-line error."""
    from click.testing import CliRunner

    import statecast.arch.mamba as mamba_mod
    from statecast.cli import main
    from statecast.convert.loading import load_model

    runner = CliRunner()
    r = runner.invoke(main, ["generate", str(pulled_hf), "--prompt-ids", "1,2,3", "--kernels", "compiled"])
    assert r.exit_code == 2 and "the rwkv family has no compiled kernels" in r.output
    assert load_model(pulled_hf)[0].kernels == "torch"  # auto, for a family with no compiled kernels
    info = pull(str(factories.hf_mamba(tmp_path / "src", seed=11)), out=tmp_path / "m", progress=False)
    r = runner.invoke(main, ["verify", info["path"], "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert report["passed"] and report["kernels"] == "compiled" and report["max_abs_diff"] < 1e-3
    assert "kernels: compiled" in (Path(info["path"]) / "parity.md").read_text()
    assert load_model(info["path"], kernels="torch")[0].kernels == "torch"
    # a machine where the kernel cannot be built: auto falls back and says why; an explicit
    # choice is an error naming why, exit 2, no traceback
    monkeypatch.setattr(mamba_mod, "_compiled", {"error": "compiled selective scan unavailable: no compiler"})
    model, _ = load_model(info["path"])
    assert model.kernels == "torch (compiled kernel unavailable: no compiler)"
    assert model.layers[0].mamba.scan_impl == "torch"
    r = runner.invoke(main, ["generate", info["path"], "--prompt-ids", "1,2,3", "--kernels", "compiled"])
    assert r.exit_code == 2 and "compiled selective scan unavailable: no compiler" in r.output
    assert "Traceback" not in r.output
