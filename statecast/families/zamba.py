"""Zamba checkpoint format: Hugging Face ``ZambaForCausalLM`` (e.g. Zyphra/Zamba-7B-v1).

What a ``ZambaForCausalLM`` checkpoint holds, and so what this table reads:
  * the shared attention + MLP block (``shared_transf.*``), canonical ``shared.0.*`` (stored
    once), under one or more of the hybrid layers that run it: transformers ties every hybrid
    layer's copy to one (``ZambaModel._tied_weights_keys``) and fills the others from whichever
    copy the file has. transformers 5.24's ``save_pretrained`` writes it under the first hybrid
    layer (``model.layers.{first}.shared_transf.*``); older versions (and Zyphra's fork), whose
    safetensors de-duplication of tied tensors kept the name that sorts LAST (layer 5 rather than
    11 or 17: "11" < "17" < "5"), wrote it under another one (as Zyphra's Hub checkpoints,
    Zamba-7B-v1 and Zamba2-*, are reported to hold it), and a file may hold it under several. Every placement is read (transformers 5.24 loads
    each). Several copies must be bitwise equal (else an error naming two keys that differ);
    a block with no copy is an error naming the keys expected under its first layer.
    WHERE the copies were is the unified config's ``shared_copies``: per block, the ascending
    hybrid layers holding one (``placement`` reads it from the tensor names at pull;
    ``null`` when every block sits under its first layer, the current form), checked on load
    by the config class (``arch.zamba.check_layout``: one non-empty list of layers running
    it per block). ``export --format hf`` writes each block under exactly those layers (under
    the first, without a record), so the source's key set comes back.
    transformers ties those copies only when ``tie_word_embeddings`` is true; with an untied
    head every hybrid layer has a block of its own, saved under it, and so does the unified
    model (``shared_blocks`` 0, 1, 2, ...: ``shared_blocks()``);
  * a hybrid layer's Mamba under ``mamba_decoder.`` (``model.layers.{i}.mamba_decoder.mamba.*``,
    ``.mamba_decoder.input_layernorm``), a Mamba layer's directly (``model.layers.{i}.mamba.*``):
    both become ``layers.{i}.mamba.*`` / ``layers.{i}.mixer_norm``, the Mamba family's names;
  * the head: no ``lm_head.weight`` when tied (the default), as for every tied family.
Which names a layer's tensors have depends on the layout, so the per-layer rules are made
from the unified config (``SourceFormat.layout``); a block's further copies are ``Rule.copy``
rows (``convert pull`` compares them with the first, bit for bit).

Numeric transforms: Zamba's in_proj interleaves the x and z rows (``deinterleave``, an exact
permutation, to the [x | z] of every Mamba mixer); per-head tensors keep their head axis, except
that one head drops it (``heads_2d`` / ``heads_3d``; see ``arch.mamba.MambaMixer``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..arch.layers import ACTIVATIONS
from ..errors import StatecastError
from .builders import seeded_checkpoint
from .mamba import dt_rank_of
from .record import KV_STATE, MAMBA_STATE, Demo, Family, HfArch, write_hf_config
from .tables import Rule, SourceFormat

# Zamba's Mamba mixer tensors -> canonical (arch.mamba.MambaMixer), with their transform
MIXER = (
    ("in_proj.weight", "in_proj.weight", "deinterleave"),
    ("in_proj.bias", "in_proj.bias", "deinterleave"),
    ("conv1d.weight", "conv1d.weight", "identity"),
    ("conv1d.bias", "conv1d.bias", "identity"),
    ("x_proj_weight", "x_proj.weight", "heads_3d"),
    ("dt_proj_weight", "dt_proj.weight", "heads_3d"),
    ("dt_proj_bias", "dt_proj.bias", "heads_2d"),
    ("A_log", "A_log", "heads_3d"),
    ("D", "D", "heads_2d"),
    ("out_proj.weight", "out_proj.weight", "identity"),
    ("out_proj.bias", "out_proj.bias", "identity"),
)
# the shared block (ZambaAttentionDecoderLayer) -> canonical (arch.zamba.SharedBlock)
SHARED = (
    ("input_layernorm.weight", "mixer_norm.weight"),
    *((f"self_attn.{p}_proj.weight", f"attn.{p}.weight") for p in "qkvo"),
    ("pre_ff_layernorm.weight", "mlp_norm.weight"),
    *((f"feed_forward.{p}_proj.weight", f"mlp.{p}.weight") for p in ("gate", "up", "down")),
)
# transformers' names for the layer kinds (legacy "mamba" is read as "linear_attention")
HF_KINDS = {"linear_attention": "mamba", "mamba": "mamba", "hybrid": "hybrid"}


def block_users(ucfg: dict) -> list[list[int]]:
    """Per shared block, the hybrid layers that run it, in order."""
    users: dict[int, list[int]] = {}
    for i, block in enumerate(ucfg["shared_blocks"]):
        if block is not None:
            users.setdefault(block, []).append(i)
    return [users[b] for b in sorted(users)]


def shared_copies(ucfg: dict) -> list[list[int]]:
    """Per shared block, the layers its checkpoint holds a copy under: the recorded
    ``shared_copies``, else the first layer that runs it."""
    recorded = ucfg.get("shared_copies")
    return [list(c) for c in recorded] if recorded else [u[:1] for u in block_users(ucfg)]


def placement(ucfg: dict, keys, shared_key: str = "shared_transf") -> dict:
    """``shared_copies`` from a checkpoint's tensor names: per block, the layers running it
    that hold any ``model.layers.{i}.{shared_key}.*`` tensor (a block with none: its first
    layer, whose names the missing-tensor error then gives); nothing when that is the first
    layer for every block (the form transformers writes, the default)."""
    held = set()
    for k in keys:
        parts = k.split(".", 4)
        if len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[3] == shared_key and parts[2].isdigit():
            held.add(int(parts[2]))
    users = block_users(ucfg)
    copies = [[i for i in u if i in held] or u[:1] for u in users]
    return {} if copies == [u[:1] for u in users] else {"shared_copies": copies}


def layer_rules(ucfg: dict, shared_key: str = "shared_transf", shared: tuple = SHARED, mixer: tuple = MIXER,
                use_rules=None) -> tuple[Rule, ...]:
    """The per-layer rules of a Zamba-style layout: each layer's Mamba (under ``mamba_decoder.``
    on a hybrid layer), each hybrid layer's ``linear``, and each shared block under every layer
    ``shared_copies`` names (``{shared_key}``; the first the block's source, the others
    ``Rule.copy``; ``shared``/``mixer``: (source, canonical[, transform]) rows). Zamba2 passes
    its own names, and ``use_rules(i, j, holder, copy)`` for what hybrid layer i (the j-th)
    keeps inside its block's tensors under layer ``holder`` (its adapters)."""
    rules, done = [], set()
    holders = shared_copies(ucfg)
    hybrid = 0
    for i, (kind, block) in enumerate(zip(ucfg["layer_kinds"], ucfg["shared_blocks"])):
        src = f"model.layers.{i}." + ("mamba_decoder." if kind == "hybrid" else "")
        rules += [Rule(f"{src}mamba.{s}", f"layers.{i}.mamba.{c}", *t) for s, c, *t in mixer]
        rules.append(Rule(f"{src}input_layernorm.weight", f"layers.{i}.mixer_norm.weight"))
        if kind == "hybrid":
            rules.append(Rule(f"model.layers.{i}.linear.weight", f"layers.{i}.shared_proj.weight"))
            for n, h in enumerate(holders[block]):
                if block not in done:
                    rules += [Rule(f"model.layers.{h}.{shared_key}.{s}", _targets(f"shared.{block}.", c), *t, copy=n > 0)
                              for s, c, *t in shared]
                rules += list(use_rules(i, hybrid, h, n > 0)) if use_rules else []
            done.add(block)
            hybrid += 1
    return tuple(rules)


def _targets(prefix: str, canonical: str | tuple[str, ...]) -> str | tuple[str, ...]:
    return tuple(prefix + c for c in canonical) if isinstance(canonical, tuple) else prefix + canonical


GLOBAL_RULES = (
    Rule("model.embed_tokens.weight", "embed.weight"),
    Rule("model.final_layernorm.weight", "final_norm.weight"),
    Rule("lm_head.weight", "lm_head.weight"),
)
HF = SourceFormat("zamba-hf", GLOBAL_RULES, optional=("lm_head.weight",), layout=layer_rules, placement=placement)


def hf_layer_kinds(cfg: dict, default) -> list[str]:
    """``layers_block_type`` (``layer_types``) as unified kinds; ``default(n)`` when absent."""
    kinds = cfg.get("layers_block_type") or cfg.get("layer_types") or default(cfg["num_hidden_layers"])
    unknown = sorted({k for k in kinds if k not in HF_KINDS})
    if unknown:
        raise ValueError(f"layers_block_type {unknown} is not supported; expected {sorted(HF_KINDS)}")
    return [HF_KINDS[k] for k in kinds]


def _zamba_default_kinds(cfg: dict):
    """ZambaConfig's rule when ``layers_block_type`` is absent: mamba, mamba, hybrid, then
    hybrid where (i - 3) % attn_layer_period == attn_layer_offset."""
    period, offset = cfg.get("attn_layer_period", 6), cfg.get("attn_layer_offset", 4)
    return lambda n: ["mamba", "mamba", "hybrid"] + ["hybrid" if i % period == offset else "mamba" for i in range(n - 3)]


def shared_blocks(kinds: list[str], tied: bool) -> list[int | None]:
    """Which block each hybrid layer runs, as transformers does: one block, the first hybrid
    layer's, tied into every hybrid layer only when ``tie_word_embeddings`` (transformers 5.24's
    ``get_expanded_tied_weights_keys`` ties nothing otherwise), else a block of its own each."""
    hybrid = [i for i, k in enumerate(kinds) if k == "hybrid"]
    return [None if k != "hybrid" else 0 if tied else hybrid.index(i) for i, k in enumerate(kinds)]


def config_from_hf(cfg: dict) -> dict:
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("hidden_mamba_act", "silu") != "silu":
        raise ValueError(f"hidden_mamba_act {cfg['hidden_mamba_act']!r} is not supported (the Mamba mixer uses silu)")
    if (cfg.get("attention_hidden_size") or 2 * d) != 2 * d:
        raise ValueError(f"attention_hidden_size {cfg['attention_hidden_size']} is not supported: the shared block "
                         f"reads [hidden, embeddings], 2 * hidden_size = {2 * d}")
    if cfg.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    kinds = hf_layer_kinds(cfg, _zamba_default_kinds(cfg))
    return {
        "vocab_size": cfg["vocab_size"],
        "d_model": d,
        "n_layer": cfg["num_hidden_layers"],
        "layer_kinds": kinds,
        "shared_blocks": shared_blocks(kinds, bool(cfg.get("tie_word_embeddings", True))),
        "n_head": heads,
        "n_kv_head": cfg.get("num_key_value_heads", 16),
        "head_dim": cfg.get("attention_head_dim") or 2 * d // heads,
        "d_ffn": cfg["intermediate_size"],
        "d_inner": int(cfg.get("mamba_expand", 2) * d),
        "d_state": cfg.get("mamba_d_state", 16),
        "d_conv": cfg.get("mamba_d_conv", 4),
        "dt_rank": dt_rank_of(cfg.get("mamba_dt_rank"), d),
        "n_mamba_heads": cfg.get("n_mamba_heads", 2),
        "act": cfg.get("hidden_act", "gelu"),
        "norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "proj_bias": bool(cfg.get("mamba_proj_bias", False)),
        "conv_bias": bool(cfg.get("mamba_conv_bias", True)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)),
    }


# config.json key -> unified key, for the fields that map one to one
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layer",
             "num_attention_heads": "n_head", "num_key_value_heads": "n_kv_head", "attention_head_dim": "head_dim",
             "intermediate_size": "d_ffn", "n_mamba_heads": "n_mamba_heads", "mamba_d_state": "d_state",
             "mamba_d_conv": "d_conv", "mamba_dt_rank": "dt_rank", "mamba_conv_bias": "conv_bias",
             "mamba_proj_bias": "proj_bias", "hidden_act": "act", "rms_norm_eps": "norm_eps",
             "tie_word_embeddings": "tie_embeddings"}


def hf_block_types(ucfg: dict, base: dict | None) -> list[str]:
    """``layers_block_type`` for config.json: the source's own spelling when it says the same."""
    ours = ["hybrid" if k == "hybrid" else "linear_attention" for k in ucfg["layer_kinds"]]
    theirs = (base or {}).get("layers_block_type")
    return theirs if theirs and [HF_KINDS.get(k) for k in theirs] == list(ucfg["layer_kinds"]) else ours


def expand_of(ucfg: dict, architecture: str) -> int:
    d, d_inner = ucfg["d_model"], ucfg["d_inner"]
    if d_inner % d:
        raise StatecastError(f"{architecture} needs d_inner a multiple of d_model, got {d_inner} and {d}")
    return d_inner // d


def hf_config(ucfg: dict, base: dict | None = None) -> dict:
    """A ``config.json`` for ``ZambaForCausalLM``; ``base`` (the source's own config) keeps its other fields."""
    if list(ucfg["shared_blocks"]) != shared_blocks(ucfg["layer_kinds"], ucfg["tie_embeddings"]):
        raise StatecastError(f"ZambaForCausalLM runs one shared block with a tied head and one per hybrid layer with an "
                             f"untied head; shared_blocks {ucfg['shared_blocks']} (tie_embeddings "
                             f"{ucfg['tie_embeddings']}) has neither form")
    defaults = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "use_cache": True}
    return write_hf_config(ucfg, base, defaults, "ZambaForCausalLM", "zamba", HF_FIELDS,
                           attention_hidden_size=2 * ucfg["d_model"], mamba_expand=expand_of(ucfg, "ZambaForCausalLM"),
                           hidden_mamba_act="silu", layers_block_type=hf_block_types(ucfg, base))


# Zamba's Mamba parameters whose init carries meaning (builders.MAMBA_INIT, Zamba's spelling)
ZAMBA_MAMBA_INIT = ("A_log", "D", "dt_proj_bias")


def build_hf_zamba(out: Path, seed: int = 0, hidden: int = 64, layers: int = 6, vocab: int = 320, heads: int = 4,
                   kv_heads: int = 2, mamba_heads: int = 2, attn_period: int = 2, attn_offset: int = 1, state: int = 8,
                   fmt: str = "safetensors", tied: bool = True, shard: str | None = None,
                   dtype: torch.dtype | None = None, **extra) -> Path:
    """A seeded ``ZambaForCausalLM`` in Hub format with a tokenizer: hybrid layers at 2 and then
    by ZambaConfig's period/offset rule (6 layers, period 2, offset 1: layers 2 and 4). ``extra``
    goes to the config."""
    from transformers import ZambaConfig, ZambaForCausalLM

    def make(vocab_size: int):
        return ZambaForCausalLM(ZambaConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, intermediate_size=2 * hidden + 32, n_mamba_heads=mamba_heads,
            attn_layer_period=attn_period, attn_layer_offset=attn_offset, mamba_d_state=state, mamba_expand=2,
            tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra))

    return seeded_checkpoint(out, make, seed=seed, vocab=vocab, fmt=fmt, shard=shard, dtype=dtype, keep=ZAMBA_MAMBA_INIT)


FAMILY = Family(
    name="zamba",
    model=("zamba", "ZambaConfig", "Zamba"),
    hf=(HfArch("zamba", "ZambaForCausalLM", (HF,), config_from_hf, hf_config),),
    state={**KV_STATE, **MAMBA_STATE},
    demo=Demo("demo-zamba", "Zamba: Mamba layers and one shared attention block (ZambaForCausalLM)", build_hf_zamba),
)
