"""Tiny real checkpoints for the tests, made with the libraries' own classes.

Hub format: transformers' ``RwkvForCausalLM(config).save_pretrained`` (safetensors,
sharded safetensors or ``pytorch_model.bin``). Native RWKV-4 ``.pth``: a state dict
with BlinkDL's tensor names and shapes (as ``rwkv.model.RWKV`` reads them), built
here independently of statecast's tables, saved with ``torch.save``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from statecast.convert.demo import build_hf_checkpoint, build_tokenizer

TINY = dict(hidden=32, layers=3, vocab=300)


def hf_rwkv(out: Path, fmt: str = "safetensors", seed: int = 0, shard: str | None = None, **dims) -> Path:
    dims = {**TINY, **dims}
    if shard is None:
        return build_hf_checkpoint(out, seed=seed, fmt=fmt, **dims)
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(seed)
    cfg = RwkvConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"], num_hidden_layers=dims["layers"],
                     intermediate_size=4 * dims["hidden"], context_length=128)
    RwkvForCausalLM(cfg).save_pretrained(out, max_shard_size=shard, safe_serialization=(fmt == "safetensors"))
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


class CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(marker, 'w')``: a stand-in for malicious code in a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
