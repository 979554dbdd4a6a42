"""Jamba checkpoint format: Hugging Face ``JambaForCausalLM`` as on the Hub.

The files hold one tensor per expert (``feed_forward.experts.{j}.gate_proj.weight``); the
unified layout stacks each MoE layer's experts into ``layers.{i}.moe.{gate,up,down}``
[X, ...] (the ``stack`` transform, written one layer's stack at a time) and splits them
back on export. The Mamba mixer's tensors carry the Mamba family's canonical names; its
dt/B/C norms (``dt_layernorm`` ...) become ``dt_norm``/``b_norm``/``c_norm``.

Which layers are attention and which carry experts is Jamba's period/offset rule in
``config.json``; the unified config stores the resulting per-layer lists, so a layout the
rule cannot express is still a valid model (it is refused only when written back as
``JambaForCausalLM``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import StatecastError
from .builders import MAMBA_INIT, seeded_checkpoint
from .mamba import MIXER_TENSORS, dt_rank_of
from .record import KV_STATE, MAMBA_STATE, Demo, Family, HfArch, write_hf_config
from .tables import Rule, SourceFormat

_BCDT_NORMS = (("dt_layernorm", "dt_norm"), ("b_layernorm", "b_norm"), ("c_layernorm", "c_norm"))
_PROJ = ("gate", "up", "down")


def _rules() -> tuple[Rule, ...]:
    h, out = "model.layers.{i}", "layers.{i}"
    ff = f"{h}.feed_forward"
    return (
        Rule("model.embed_tokens.weight", "embed.weight"),
        Rule(f"{h}.input_layernorm.weight", f"{out}.mixer_norm.weight"),
        *(Rule(f"{h}.self_attn.{p}_proj.weight", f"{out}.attn.{p}.weight") for p in "qkvo"),
        *(Rule(f"{h}.mamba.{t}", f"{out}.mamba.{t}") for t in MIXER_TENSORS),
        *(Rule(f"{h}.mamba.{src}.weight", f"{out}.mamba.{dst}.weight") for src, dst in _BCDT_NORMS),
        Rule(f"{h}.pre_ff_layernorm.weight", f"{out}.mlp_norm.weight"),
        *(Rule(f"{ff}.{p}_proj.weight", f"{out}.mlp.{p}.weight") for p in _PROJ),
        Rule(f"{ff}.router.weight", f"{out}.moe.router.weight"),
        *(Rule(f"{ff}.experts.{{j}}.{p}_proj.weight", f"{out}.moe.{p}", "stack") for p in _PROJ),
        Rule("model.final_layernorm.weight", "final_norm.weight"),
        Rule("lm_head.weight", "lm_head.weight"),
    )


HF = SourceFormat("jamba-hf", _rules(), optional=("lm_head.weight",))


def _every(n: int, period: int, offset: int, yes: str, no: str) -> list[str]:
    return [yes if i % period == offset else no for i in range(n)]


def config_from_hf(cfg: dict) -> dict:
    d, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    experts = cfg.get("num_experts", 16)
    for period, offset in (("attn_layer_period", "attn_layer_offset"), ("expert_layer_period", "expert_layer_offset")):
        if cfg.get(offset, 0) >= cfg.get(period, 1):
            raise ValueError(f"{offset} ({cfg[offset]}) must be smaller than {period} ({cfg[period]})")
    return {
        "vocab_size": cfg["vocab_size"],
        "d_model": d,
        "n_layer": n,
        "layer_kinds": _every(n, cfg.get("attn_layer_period", 8), cfg.get("attn_layer_offset", 4), "attention", "mamba"),
        # transformers: a layer has experts iff num_experts > 1 and the period rule picks it
        "ffn_kinds": _every(n, cfg.get("expert_layer_period", 2), cfg.get("expert_layer_offset", 1),
                            "moe" if experts > 1 else "mlp", "mlp"),
        "n_head": heads,
        "n_kv_head": cfg.get("num_key_value_heads") or heads,
        "head_dim": d // heads,
        "d_ffn": cfg["intermediate_size"],
        "n_experts": experts,
        "top_k": cfg.get("num_experts_per_tok", 2),
        "d_inner": int(cfg.get("mamba_expand", 2) * d),
        "d_state": cfg.get("mamba_d_state", 16),
        "d_conv": cfg.get("mamba_d_conv", 4),
        "dt_rank": dt_rank_of(cfg.get("mamba_dt_rank"), d),
        "act": cfg.get("hidden_act", "silu"),
        "norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "proj_bias": bool(cfg.get("mamba_proj_bias", False)),
        "conv_bias": bool(cfg.get("mamba_conv_bias", True)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def _period(kinds: list[str], kind: str, what: str) -> tuple[int, int]:
    """(period, offset) with ``kinds[i] == kind`` exactly when ``i % period == offset``."""
    n = len(kinds)
    for period in range(1, n + 1):
        for offset in range(period):
            if _every(n, period, offset, kind, "") == [k if k == kind else "" for k in kinds]:
                return period, offset
    raise StatecastError(f"the {what} layout {kinds} has no period/offset form; JambaForCausalLM cannot hold it")


# config.json key -> unified key, for the fields that map one to one
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layer",
             "num_attention_heads": "n_head", "num_key_value_heads": "n_kv_head", "intermediate_size": "d_ffn",
             "num_experts_per_tok": "top_k", "mamba_d_state": "d_state", "mamba_d_conv": "d_conv", "mamba_dt_rank": "dt_rank",
             "mamba_conv_bias": "conv_bias", "mamba_proj_bias": "proj_bias", "hidden_act": "act", "rms_norm_eps": "norm_eps",
             "tie_word_embeddings": "tie_embeddings"}


def hf_config(ucfg: dict, base: dict | None = None) -> dict:
    """A ``config.json`` for ``JambaForCausalLM``; ``base`` (the source's own config) keeps its other fields."""
    d = ucfg["d_model"]
    if ucfg["head_dim"] * ucfg["n_head"] != d:
        raise StatecastError(f"JambaForCausalLM needs head_dim * n_head == d_model, got {ucfg['head_dim']} * {ucfg['n_head']} != {d}")
    if ucfg["d_inner"] % d:
        raise StatecastError(f"JambaForCausalLM needs d_inner a multiple of d_model, got {ucfg['d_inner']} and {d}")
    attn_period, attn_offset = _period(ucfg["layer_kinds"], "attention", "attention")
    moe = "moe" in ucfg["ffn_kinds"]
    experts = dict(zip(("expert_layer_period", "expert_layer_offset"), _period(ucfg["ffn_kinds"], "moe", "expert"))) if moe else {}
    return write_hf_config(ucfg, base, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "use_cache": True},
                           "JambaForCausalLM", "jamba", HF_FIELDS, attn_layer_period=attn_period,
                           attn_layer_offset=attn_offset, num_experts=ucfg["n_experts"] if moe else 1,
                           mamba_expand=ucfg["d_inner"] // d, **experts)


def build_hf_jamba(out: Path, seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 320, heads: int = 4,
                   kv_heads: int = 2, experts: int = 4, top_k: int = 2, attn_period: int = 2, attn_offset: int = 1,
                   expert_period: int = 2, expert_offset: int = 1, state: int = 8, fmt: str = "safetensors",
                   tied: bool = False, shard: str | None = None, dtype: torch.dtype | None = None, **extra) -> Path:
    """A seeded ``JambaForCausalLM`` in Hub format (one tensor per expert, as on the Hub) with
    a tokenizer. ``extra`` goes to the config."""
    from transformers import JambaConfig, JambaForCausalLM

    def make(vocab_size: int):
        return JambaForCausalLM(JambaConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, intermediate_size=2 * hidden + 32, num_experts=experts, num_experts_per_tok=top_k,
            attn_layer_period=attn_period, attn_layer_offset=attn_offset, expert_layer_period=expert_period,
            expert_layer_offset=expert_offset, mamba_d_state=state, mamba_expand=2, tie_word_embeddings=tied,
            bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra))

    return seeded_checkpoint(out, make, seed=seed, vocab=vocab, fmt=fmt, shard=shard, dtype=dtype, keep=MAMBA_INIT)


FAMILY = Family(
    name="jamba",
    model=("jamba", "JambaConfig", "Jamba"),
    hf=(HfArch("jamba", "JambaForCausalLM", (HF,), config_from_hf, hf_config),),
    state={**KV_STATE, **MAMBA_STATE},
    demo=Demo("demo-jamba", "Jamba: attention + Mamba layers, mixture of experts (JambaForCausalLM)", build_hf_jamba),
)
