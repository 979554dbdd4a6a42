"""Zamba2 checkpoint format: Hugging Face ``Zamba2ForCausalLM`` (e.g. Zyphra/Zamba2-1.2B, -2.7B, -7B).

The layout is Zamba's (``families/zamba.py``, whose per-layer rules and placement this
reuses): the Mamba mixer of a hybrid layer under ``mamba_decoder.``, each hybrid layer's
``linear``, and each of the ``num_mem_blocks`` shared blocks (``shared_transformer.*``; the
j-th hybrid layer runs block j % num_mem_blocks, transformers tying its uses into one) under one
or more of the layers that run it: transformers 5.24 saves it under the first, Zyphra's Hub
checkpoints were saved by older code that kept the last-sorting name; where they were is the
unified config's ``shared_copies``, as for Zamba (copies bitwise equal, written back there).
The block's tensors also hold its uses' adapters, by the use's hybrid index j (every copy holds
them all: it is the same module): ``self_attn.linear_{q,k,v}_adapter_list.{j}.{0,1}`` and
``feed_forward.gate_up_proj_adapter_list.{j}.{0,1}`` (down, up); they become the using layer's
``layers.{i}.attn_adapter.{q,k,v}.{down,up}`` / ``layers.{i}.mlp_adapter.{down,up}`` and go back
under each copy of the block on export. The Mamba-2 mixer's tensors carry the Mamba-2 family's names; the
MLP's fused ``gate_up_proj`` is split into ``mlp.gate`` / ``mlp.up`` (``split_gate_up``).

As for Zamba, transformers ties the blocks only when ``tie_word_embeddings`` is true; an untied
Zamba2ForCausalLM has a block per hybrid layer, each holding adapter slots of the later uses
that would have shared it, which it never runs: refused by name when there are such slots
(more hybrid layers than num_mem_blocks).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..arch.layers import ACTIVATIONS
from ..errors import StatecastError
from .builders import seeded_checkpoint
from .mamba2 import MAMBA2_INIT, MIXER_TENSORS
from .record import KV_STATE, MAMBA_STATE, Demo, Family, HfArch, write_hf_config
from .tables import Rule, SourceFormat
from .transformer import rope_from_hf
from .zamba import GLOBAL_RULES, hf_block_types, hf_layer_kinds, layer_rules, placement

MIXER = tuple((t, t) for t in MIXER_TENSORS)  # the Mamba-2 family's names, unchanged
SHARED = (
    ("input_layernorm.weight", "mixer_norm.weight"),
    *((f"self_attn.{p}_proj.weight", f"attn.{p}.weight") for p in "qkvo"),
    ("pre_ff_layernorm.weight", "mlp_norm.weight"),
    ("feed_forward.gate_up_proj.weight", ("mlp.gate.weight", "mlp.up.weight"), "split_gate_up"),
    ("feed_forward.gate_up_proj.bias", ("mlp.gate.bias", "mlp.up.bias"), "split_gate_up"),
    ("feed_forward.down_proj.weight", "mlp.down.weight"),
    ("feed_forward.down_proj.bias", "mlp.down.bias"),
)
_LORA = (("0", "down"), ("1", "up"))  # nn.Sequential(Linear(in, r), Linear(r, out))


def adapter_rules(i: int, j: int, holder: int, copy: bool = False) -> list[Rule]:
    """Hybrid layer ``i`` (the ``j``-th) keeps its adapters in slot j of its block, stored under
    layer ``holder`` (``copy``: a further copy of the block, ``Rule.copy``)."""
    block = f"model.layers.{holder}.shared_transformer"
    rules = [Rule(f"{block}.self_attn.linear_{p}_adapter_list.{j}.{s}.weight", f"layers.{i}.attn_adapter.{p}.{c}.weight",
                  copy=copy) for p in "qkv" for s, c in _LORA]
    return rules + [Rule(f"{block}.feed_forward.gate_up_proj_adapter_list.{j}.{s}.weight", f"layers.{i}.mlp_adapter.{c}.weight",
                         copy=copy) for s, c in _LORA]


def _layout(ucfg: dict) -> tuple[Rule, ...]:
    kinds = ["mamba" if k == "mamba2" else k for k in ucfg["layer_kinds"]]
    return layer_rules({**ucfg, "layer_kinds": kinds}, "shared_transformer", SHARED, MIXER, adapter_rules)


def _placement(ucfg: dict, keys) -> dict:
    return placement(ucfg, keys, "shared_transformer")


HF = SourceFormat("zamba2-hf", GLOBAL_RULES, optional=("lm_head.weight",), layout=_layout, placement=_placement)

# Zamba2Config's layout when layers_block_type is absent (54 layers: Zamba2-2.7B's)
_DEFAULT_KINDS = (["mamba"] + (["mamba"] * 5 + ["hybrid"]) * 7 + ["mamba"] * 4 + ["hybrid"] + ["mamba"] * 3
                  + ["hybrid"] + ["mamba"] * 2)


def _default_kinds(n: int) -> list[str]:
    if n != len(_DEFAULT_KINDS):
        raise ValueError(f"no layers_block_type, and Zamba2Config's default layout has {len(_DEFAULT_KINDS)} layers, not {n}")
    return list(_DEFAULT_KINDS)


def shared_blocks(kinds: list[str], n_blocks: int, tied: bool) -> list[int | None]:
    """The j-th hybrid layer runs block j % num_mem_blocks (``Zamba2Model.get_layers``), tied
    into one only when ``tie_word_embeddings`` (see the module docstring)."""
    hybrid = [i for i, k in enumerate(kinds) if k == "hybrid"]
    if not tied and len(hybrid) > n_blocks:
        raise ValueError(f"tie_word_embeddings false with {len(hybrid)} hybrid layers and num_mem_blocks {n_blocks}: "
                         "transformers then runs a block per hybrid layer, holding adapters it never uses; not supported")
    return [None if k != "hybrid" else hybrid.index(i) % n_blocks for i, k in enumerate(kinds)]


def config_from_hf(cfg: dict) -> dict:
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if 2 * d % heads:
        raise ValueError(f"num_attention_heads {heads} does not divide 2 * hidden_size = {2 * d} (the attention width)")
    if cfg.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    d_inner, m_heads = int(cfg.get("mamba_expand", 2) * d), cfg.get("n_mamba_heads", 8)
    if d_inner % m_heads:
        raise ValueError(f"n_mamba_heads {m_heads} does not divide mamba_expand * hidden_size = {d_inner}")
    kinds = ["mamba2" if k == "mamba" else k for k in hf_layer_kinds(cfg, _default_kinds)]
    theta, scaling = rope_from_hf(cfg)
    tied = bool(cfg.get("tie_word_embeddings", True))
    return {
        "vocab_size": cfg["vocab_size"],
        "d_model": d,
        "n_layer": cfg["num_hidden_layers"],
        "layer_kinds": kinds,
        "shared_blocks": shared_blocks(kinds, cfg.get("num_mem_blocks", 1), tied),
        "n_head": heads,
        "n_kv_head": cfg.get("num_key_value_heads") or heads,
        "head_dim": 2 * d // heads,  # Zamba2Config sets attention_head_dim so, whatever config.json says
        "d_ffn": cfg.get("intermediate_size") or 4 * d,
        "n_mamba_heads": m_heads,
        "mamba_head_dim": d_inner // m_heads,
        "d_state": cfg.get("mamba_d_state", 64),
        "n_groups": cfg.get("mamba_ngroups", 1),
        "d_conv": cfg.get("mamba_d_conv", 4),
        "chunk_size": cfg.get("chunk_size", 256),
        "adapter_rank": cfg.get("adapter_rank", 128),
        "attn_adapters": bool(cfg.get("use_shared_attention_adapter", False)),
        "positions": "rope" if cfg.get("use_mem_rope", False) else "none",
        "rope_theta": theta,
        "rope_scaling": scaling,
        "act": cfg.get("hidden_act", "gelu"),
        "norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "proj_bias": bool(cfg.get("add_bias_linear", False)),
        "dt_limit_min": float(cfg.get("time_step_min", 0.001)),
        "tie_embeddings": tied,
    }


# config.json key -> unified key, for the fields that map one to one
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layer",
             "num_attention_heads": "n_head", "num_key_value_heads": "n_kv_head", "intermediate_size": "d_ffn",
             "n_mamba_heads": "n_mamba_heads", "mamba_d_state": "d_state", "mamba_ngroups": "n_groups",
             "mamba_d_conv": "d_conv", "chunk_size": "chunk_size", "adapter_rank": "adapter_rank",
             "use_shared_attention_adapter": "attn_adapters", "hidden_act": "act", "rms_norm_eps": "norm_eps",
             "add_bias_linear": "proj_bias", "time_step_min": "dt_limit_min", "tie_word_embeddings": "tie_embeddings"}


def _runs(kinds: list[str], n_blocks: int, ucfg: dict) -> bool:
    """Whether Zamba2ForCausalLM with ``n_blocks`` mem blocks runs the unified layout."""
    try:
        return shared_blocks(kinds, n_blocks, ucfg["tie_embeddings"]) == list(ucfg["shared_blocks"])
    except ValueError:
        return False


def hf_config(ucfg: dict, base: dict | None = None) -> dict:
    """A ``config.json`` for ``Zamba2ForCausalLM``; ``base`` (the source's own config) keeps its other fields."""
    d, d_inner = ucfg["d_model"], ucfg["n_mamba_heads"] * ucfg["mamba_head_dim"]
    if ucfg["head_dim"] * ucfg["n_head"] != 2 * d:
        raise StatecastError(f"Zamba2ForCausalLM needs head_dim * n_head == 2 * d_model, got {ucfg['head_dim']} * "
                             f"{ucfg['n_head']} != {2 * d}")
    if d_inner % d:
        raise StatecastError(f"Zamba2ForCausalLM needs the Mamba width a multiple of d_model, got {d_inner} and {d}")
    kinds = ["mamba" if k == "mamba2" else k for k in ucfg["layer_kinds"]]
    candidates = ((base or {}).get("num_mem_blocks"), 1 + max(b for b in ucfg["shared_blocks"] if b is not None))
    n_blocks = next((m for m in candidates if m and _runs(kinds, m, ucfg)), None)  # the source's own number first
    if n_blocks is None:
        raise StatecastError(f"Zamba2ForCausalLM runs block j % num_mem_blocks at its j-th hybrid layer; shared_blocks "
                             f"{ucfg['shared_blocks']} (tie_embeddings {ucfg['tie_embeddings']}) has no such form")
    base = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")} if base else None  # rope_parameters
    scaling = ucfg.get("rope_scaling") or {"rope_type": "default"}
    defaults = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "use_cache": True}
    return write_hf_config({**ucfg, "layer_kinds": kinds}, base, defaults, "Zamba2ForCausalLM", "zamba2", HF_FIELDS,
                           mamba_expand=d_inner // d, num_mem_blocks=n_blocks, use_mem_rope=ucfg["positions"] == "rope",
                           rope_parameters={**scaling, "rope_theta": ucfg["rope_theta"]},
                           layers_block_type=hf_block_types({**ucfg, "layer_kinds": kinds}, base))


def build_hf_zamba2(out: Path, seed: int = 0, hidden: int = 64, layers: int = 6, vocab: int = 320, heads: int = 4,
                    blocks: int = 2, mamba_heads: int = 8, groups: int = 2, state: int = 8, chunk: int = 16, rank: int = 4,
                    hybrid: tuple[int, ...] = (1, 3, 5), attn_adapters: bool = True, rope: bool = True,
                    dt_min: float = 0.001, fmt: str = "safetensors", tied: bool = True, shard: str | None = None,
                    dtype: torch.dtype | None = None, **extra) -> Path:
    """A seeded ``Zamba2ForCausalLM`` in Hub format with a tokenizer: hybrid layers ``hybrid``
    running ``blocks`` shared blocks in turn, LoRA adapters of rank ``rank`` on q/k/v and on
    the MLP, rotary positions, Mamba-2 chunks of ``chunk`` tokens. ``extra`` goes to the config.

    ``dt_min`` is ``time_step_min`` (transformers' default 0.001), which transformers also uses
    as a lower clamp of dt on its whole-sequence path only (not in its cached step); it binds
    for many of a random model's tokens, so its forward and its generate disagree there, and
    so do our parallel and step paths, which mirror them (verify's step check runs the whole
    sequence under the step's rule: ``CausalLM.parallel_as_step``)."""
    from transformers import Zamba2Config, Zamba2ForCausalLM

    kinds = ["hybrid" if i in hybrid else "mamba" for i in range(layers)]

    def make(vocab_size: int):
        return Zamba2ForCausalLM(Zamba2Config(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, layers_block_type=kinds,
            num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=2 * hidden + 32,
            n_mamba_heads=mamba_heads, mamba_ngroups=groups, mamba_d_state=state, chunk_size=chunk, num_mem_blocks=blocks,
            use_shared_attention_adapter=attn_adapters, adapter_rank=rank, use_mem_rope=rope, tie_word_embeddings=tied,
            time_step_min=dt_min,
            bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra))

    return seeded_checkpoint(out, make, seed=seed, vocab=vocab, fmt=fmt, shard=shard, dtype=dtype, keep=MAMBA2_INIT)


FAMILY = Family(
    name="zamba2",
    model=("zamba2", "Zamba2Config", "Zamba2"),
    hf=(HfArch("zamba2", "Zamba2ForCausalLM", (HF,), config_from_hf, hf_config),),
    state={**KV_STATE, **MAMBA_STATE},
    demo=Demo("demo-zamba2", "Zamba2: Mamba-2 layers, two shared attention blocks with LoRA adapters "
              "(Zamba2ForCausalLM)", build_hf_zamba2),
)
