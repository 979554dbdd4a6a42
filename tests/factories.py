"""Tiny real checkpoints for the tests, made with the libraries' own classes.

Hub format: transformers' own classes (``RwkvForCausalLM``, ``MambaForCausalLM``,
``FalconMambaForCausalLM``, ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...) and
``save_pretrained`` (safetensors, sharded safetensors or ``pytorch_model.bin``), through
the same builders as ``convert demo``. Native state-spaces Mamba: a ``config.json`` and
``pytorch_model.bin`` as ``mamba_ssm`` writes them. Native RWKV-4 ``.pth``: a state dict
with BlinkDL's tensor names and shapes (as ``rwkv.model.RWKV`` reads them), built
here independently of statecast's tables, saved with ``torch.save``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from statecast.families.builders import MAMBA_INIT, build_tokenizer, spread_weights
from statecast.families.jamba import build_hf_jamba
from statecast.families.mamba import build_hf_mamba
from statecast.families.mamba2 import MAMBA2_INIT, build_hf_mamba2
from statecast.families.rwkv import build_hf_rwkv
from statecast.families.transformer import build_hf_transformer
from statecast.families.zamba import build_hf_zamba
from statecast.families.zamba2 import build_hf_zamba2

TINY = dict(hidden=32, layers=3, vocab=300)


def hf_rwkv(out: Path, fmt: str = "safetensors", seed: int = 0, shard: str | None = None, **dims) -> Path:
    return build_hf_rwkv(out, seed=seed, fmt=fmt, shard=shard, **{**TINY, **dims})


def hf_mamba(out: Path, **kw) -> Path:
    return build_hf_mamba(out, **{"hidden": 32, "layers": 3, "vocab": 300, **kw})


def hf_transformer(out: Path, style: str, **kw) -> Path:
    return build_hf_transformer(out, style, **{"hidden": 32, "layers": 3, "vocab": 300, **kw})


def hf_jamba(out: Path, **kw) -> Path:
    return build_hf_jamba(out, **{"hidden": 32, "layers": 4, "vocab": 300, **kw})



def hf_zamba(out: Path, **kw) -> Path:
    return build_hf_zamba(out, **{"hidden": 32, "layers": 6, "vocab": 300, **kw})


def hf_zamba2(out: Path, **kw) -> Path:
    """Zamba2ForCausalLM: hybrid layers 1, 3, 5 of 6 running 2 shared blocks in turn, rank-4
    adapters, rotary positions, Mamba-2 chunks of 16 (verify's 64-token prompts span 4)."""
    return build_hf_zamba2(out, **{"hidden": 32, "layers": 6, "vocab": 300, **kw})


def restore_shared(src: Path, key: str, holders: dict[int, list[int]]) -> Path:
    """Rewrite a Zamba / Zamba2 checkpoint (one safetensors file) so that the shared block
    ``save_pretrained`` wrote under layer f (``model.layers.{f}.{key}.*``) is stored under each
    layer of ``holders[f]`` instead: as older transformers (keeping the tied name that sorts
    last) or a file with every copy has it. In place; returns ``src``."""
    from safetensors.torch import load_file, save_file

    f = src / "model.safetensors"
    out = {}
    for k, v in load_file(f).items():
        parts = k.split(".", 4)
        if parts[:2] == ["model", "layers"] and len(parts) == 5 and parts[3] == key and int(parts[2]) in holders:
            out.update({f"model.layers.{h}.{key}.{parts[4]}": v.clone() for h in holders[int(parts[2])]})
        else:
            out[k] = v
    save_file(out, f, metadata={"format": "pt"})
    return src


def gpt2_bare(out: Path, seed: int = 3) -> Path:
    """GPT-2 saved from ``GPT2Model`` (no ``transformer.`` prefix, no head), as the
    original openai-community/gpt2 upload is."""
    from transformers import GPT2LMHeadModel

    src = hf_transformer(out.with_name(out.name + "-full"), "gpt2", seed=seed, tied=True)
    model = GPT2LMHeadModel.from_pretrained(src)
    model.transformer.save_pretrained(out)
    (out / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    return out


# The only name that differs between the state-spaces format and transformers' Mamba.
_STATE_SPACES_NAMES = {"backbone.embeddings.weight": "backbone.embedding.weight"}


def native_mamba(out: Path, seed: int = 4, vocab: int = 300, pad_multiple: int = 8) -> Path:
    """A state-spaces ``MambaLMHeadModel`` checkpoint: its ``config.json`` (d_model, n_layer,
    ssm_cfg, pad_vocab_size_multiple, ...) and ``pytorch_model.bin`` with the embedding
    padded to a multiple of ``pad_multiple`` and the tied head saved beside it."""
    import json

    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    padded = math.ceil(vocab / pad_multiple) * pad_multiple
    model = MambaForCausalLM(MambaConfig(vocab_size=padded, hidden_size=32, num_hidden_layers=3, state_size=16))
    spread_weights(model, seed, keep=MAMBA_INIT)
    sd = {_STATE_SPACES_NAMES.get(k, k): v for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # mamba_ssm ties, and torch.save keeps both names
    out.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out / "pytorch_model.bin")
    config = {"d_model": 32, "d_intermediate": 0, "n_layer": 3, "vocab_size": vocab,
              "ssm_cfg": {}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": pad_multiple, "tie_embeddings": True}
    (out / "config.json").write_text(json.dumps(config))
    build_tokenizer(vocab).save(str(out / "tokenizer.json"))
    return out


def hf_mamba2(out: Path, **kw) -> Path:
    """Mamba2ForCausalLM: 2 groups of 4 heads, chunk 16 (verify's 64-token prompts span 4 chunks)."""
    return build_hf_mamba2(out, **{"hidden": 32, "layers": 3, "vocab": 300, "heads": 8, "head_dim": 8, "groups": 2,
                                   "state": 16, "chunk": 16, **kw})


def native_mamba2(out: Path, seed: int = 12, vocab: int = 300, pad_multiple: int = 16, **config) -> Path:
    """A state-spaces ``MambaLMHeadModel`` checkpoint with Mamba-2 mixers, as ``mamba_ssm``
    writes it: ``config.json`` in its form (``ssm_cfg.layer = "Mamba2"``, headdim, ngroups,
    d_state, chunk_size; d_conv and expand left to the module's defaults) and
    ``pytorch_model.bin`` with the padded embedding and the tied head beside it. The tensors
    come from transformers' ``Mamba2ForCausalLM`` renamed to the native names; ``config``
    overrides top-level config.json keys."""
    import json

    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    padded = math.ceil(vocab / pad_multiple) * pad_multiple
    d, heads, head_dim, groups, state, chunk = 32, 16, 4, 4, 8, 8
    model = Mamba2ForCausalLM(Mamba2Config(vocab_size=padded, hidden_size=d, num_hidden_layers=3, num_heads=heads,
                                           head_dim=head_dim, expand=2, n_groups=groups, state_size=state,
                                           chunk_size=chunk, tie_word_embeddings=True))
    spread_weights(model, seed, keep=MAMBA2_INIT)
    sd = {_STATE_SPACES_NAMES.get(k, k): v for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # mamba_ssm ties, and torch.save keeps both names
    out.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out / "pytorch_model.bin")
    cfg = {"d_model": d, "d_intermediate": 0, "n_layer": 3, "vocab_size": vocab,
           "ssm_cfg": {"layer": "Mamba2", "headdim": head_dim, "ngroups": groups, "d_state": state, "chunk_size": chunk},
           "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": pad_multiple, "tie_embeddings": True, **config}
    (out / "config.json").write_text(json.dumps(cfg))
    build_tokenizer(vocab).save(str(out / "tokenizer.json"))
    return out


def native_rwkv4_state(n_layer: int = 3, d: int = 32, vocab: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    """BlinkDL RWKV-4 names and shapes with a trained-like initialisation."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    ffn = 4 * d
    sd = {"emb.weight": randn(vocab, d, std=0.5)}
    sd["blocks.0.ln0.weight"] = 1 + randn(d, std=0.1)
    sd["blocks.0.ln0.bias"] = randn(d, std=0.1)
    ramp = torch.arange(d) / max(d - 1, 1)
    for i in range(n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"] = 1 + randn(d, std=0.1)
            sd[b + ln + ".bias"] = randn(d, std=0.1)
        ratio = 1 - i / n_layer
        sd[b + "att.time_decay"] = -5 + 8 * ramp ** (0.7 + 1.3 * i / max(n_layer - 1, 1))
        sd[b + "att.time_first"] = math.log(0.3) + 0.5 * torch.sin(torch.arange(d) * 1.7)
        sd[b + "att.time_mix_k"] = (ramp ** ratio).reshape(1, 1, d)
        sd[b + "att.time_mix_v"] = (ramp ** ratio + 0.3 * i / n_layer).reshape(1, 1, d)
        sd[b + "att.time_mix_r"] = (ramp ** (0.5 * ratio)).reshape(1, 1, d)
        for name, shape in (("key", (d, d)), ("value", (d, d)), ("receptance", (d, d)), ("output", (d, d))):
            sd[b + f"att.{name}.weight"] = randn(*shape, std=d ** -0.5)
        sd[b + "ffn.time_mix_k"] = (ramp ** ratio).reshape(1, 1, d)
        sd[b + "ffn.time_mix_r"] = (ramp ** ratio).reshape(1, 1, d)
        sd[b + "ffn.key.weight"] = randn(ffn, d, std=d ** -0.5)
        sd[b + "ffn.receptance.weight"] = randn(d, d, std=d ** -0.5)
        sd[b + "ffn.value.weight"] = randn(d, ffn, std=ffn ** -0.5)
    sd["ln_out.weight"] = 1 + randn(d, std=0.1)
    sd["ln_out.bias"] = randn(d, std=0.1)
    sd["head.weight"] = randn(vocab, d, std=d ** -0.5)
    return sd


def native_rwkv4(out_dir: Path, name: str = "RWKV-4-tiny.pth", tokenizer: bool = True, **kw) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = native_rwkv4_state(**kw)
    path = out_dir / name
    torch.save(sd, path)
    if tokenizer:  # BlinkDL ships the Pile tokenizer as 20B_tokenizer.json next to the weights
        build_tokenizer(sd["emb.weight"].shape[0]).save(str(out_dir / "20B_tokenizer.json"))
    return path


def run_steps(model, ids: torch.Tensor, state):
    """Feed ``ids [B, T]`` one token at a time through ``model.step``: ([B, T, V] logits, final state)."""
    outs = []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        outs.append(logits)
    return torch.stack(outs, 1), state


@torch.no_grad()
def parallel_and_steps(model, vocab: int, T: int, warm: int = 0, seed: int | None = None):
    """Run ``[2, T]`` random ids through the whole-sequence path and token by token, both from
    the same state (empty, or after ``warm`` stepped tokens), and check that neither call
    mutated that state. Returns (parallel logits, its state, stepped logits, their state).
    The whole sequence runs under the step's rule where the reference's two paths differ
    (``CausalLM.parallel_as_step``: Mamba-2's dt limit), so this compares our two code paths."""
    g = torch.Generator().manual_seed(T if seed is None else seed)
    ids = torch.randint(0, vocab, (2, T), generator=g)
    state = run_steps(model, torch.randint(0, vocab, (2, warm), generator=g), None)[1] if warm else None
    before = [t.clone() for t in state] if state is not None else []
    with model.parallel_as_step():
        lp, sp = model(ids, state)
    ls, ss = run_steps(model, ids, state)
    for b, a in zip(before, state or []):  # never mutated in place
        assert torch.equal(b, a)
    return lp, sp, ls, ss


class CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(marker, 'w')``: a stand-in for malicious code in a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
