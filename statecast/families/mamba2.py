"""Mamba-2 checkpoint formats: Hugging Face ``Mamba2ForCausalLM`` (e.g.
``mistralai/Mamba-Codestral-7B-v0.1``) and the native state-spaces format (``mamba_ssm``'s
``MambaLMHeadModel`` with ``ssm_cfg.layer = "Mamba2"``, e.g. ``state-spaces/mamba2-130m``).

Both hold the same tensors under nearly the same names (the embedding is ``embedding`` in
the native files, ``embeddings`` in transformers'); no numeric transform (``A_log`` is kept as
stored, as for Mamba-1).

Config notes:
  * ``time_step_limit`` (HF) / ``ssm_cfg.dt_limit`` (native): the dt clamp of the whole-sequence
    path. transformers 5 writes its infinite default as ``{"__float__": "Infinity"}``; the unified
    config keeps ``dt_limit_max`` null for "no upper bound".
  * transformers' Mamba2 always gates before normalising; older transformers versions wrote
    ``norm_before_gate`` (default true) and ``rms_norm`` into config.json without reading them,
    so neither is read from a Hub config here either. A native ``ssm_cfg.norm_before_gate``
    that is true is refused: no reference implementation here computes it.
  * transformers 5.24's ``Mamba2Mixer`` sizes ``in_proj`` as exactly z | xBC | dt (older versions
    and mamba_ssm split off a gated-MLP part ``d_mlp`` when in_proj is wider, i.e. ``d_ssm`` <
    d_inner); a wider in_proj is a mis-shaped tensor, and a native ``ssm_cfg.d_ssm`` is refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import StatecastError
from .builders import seeded_checkpoint
from .mamba import _looks_native, backbone_rules, state_spaces_layer
from .record import MAMBA_STATE, Demo, Family, HfArch, NativeFormat, write_hf_config
from .references import HfReference, RenamedHfReference
from .tables import SourceFormat

MIXER_TENSORS = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D",
                 "norm.weight", "out_proj.weight", "out_proj.bias")
# Mamba-2 parameters whose init carries meaning (A_log = log(1..H), D = 1, the inverse-softplus
# dt bias): left as transformers initialised them by the demo builder's spread_weights
MAMBA2_INIT = ("A_log", "D", "dt_bias")


HF = SourceFormat("mamba2-hf", backbone_rules("embeddings", MIXER_TENSORS), optional=("lm_head.weight",))
NATIVE = SourceFormat("mamba2-native", backbone_rules("embedding", MIXER_TENSORS), optional=("lm_head.weight",))
# native name -> transformers' Mamba2ForCausalLM name (every other name is the same)
NATIVE_MAMBA2_RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def json_float(value) -> float:
    """A number from config.json, including transformers 5's spelling of the non-JSON floats
    (``{"__float__": "Infinity"}``) and the string forms ("Infinity", "inf")."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    if isinstance(value, str) and value.strip().lower().lstrip("+") in ("inf", "infinity"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r:.60}")
    return float(value)


def dt_limits(limit, key: str) -> dict:
    """``time_step_limit`` / ``dt_limit`` [min, max] -> the unified ``dt_limit_min`` / ``dt_limit_max``."""
    if not isinstance(limit, (list, tuple)) or len(limit) != 2:
        raise ValueError(f"{key} must be [min, max], got {limit!r:.60}")
    lo, hi = (json_float(v) for v in limit)
    if not (math.isfinite(lo) and 0 <= lo <= hi):
        raise ValueError(f"{key} must satisfy 0 <= min <= max with a finite min, got {limit!r:.60}")
    return {"dt_limit_min": lo, "dt_limit_max": None if hi == math.inf else hi}


def _dt_limit_json(ucfg: dict) -> list:
    """The unified dt limits as config.json writes them (transformers 5's spelling of infinity)."""
    hi = ucfg["dt_limit_max"]
    return [ucfg["dt_limit_min"], {"__float__": "Infinity"} if hi is None else hi]


def config_from_hf(cfg: dict) -> dict:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (Mamba-2 uses silu)")
    d = cfg["hidden_size"]
    heads, head_dim = cfg.get("num_heads", 128), cfg.get("head_dim", 64)
    expand = cfg.get("expand", 2)
    if int(expand * d) != heads * head_dim:  # transformers' validate_architecture
        raise ValueError(f"expand * hidden_size ({expand} * {d}) must equal num_heads * head_dim ({heads} * {head_dim})")
    return {
        "vocab_size": cfg["vocab_size"],
        "d_model": d,
        "n_layer": cfg["num_hidden_layers"],
        "n_heads": heads,
        "head_dim": head_dim,
        "d_state": cfg.get("state_size", 128),
        "n_groups": cfg.get("n_groups", 8),
        "d_conv": cfg.get("conv_kernel", 4),
        "chunk_size": cfg.get("chunk_size", 256),
        "norm_eps": cfg.get("layer_norm_epsilon", 1e-5),
        "proj_bias": bool(cfg.get("use_bias", False)),
        "conv_bias": bool(cfg.get("use_conv_bias", True)),
        "norm_before_gate": False,  # transformers' MambaRMSNormGated: always the gate first
        **dt_limits(cfg.get("time_step_limit", (0.0, math.inf)), "time_step_limit"),
        "residual_in_fp32": bool(cfg.get("residual_in_fp32", True)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


# config.json key -> unified key, for the fields that map one to one
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_heads": "n_heads",
             "head_dim": "head_dim", "state_size": "d_state", "n_groups": "n_groups", "conv_kernel": "d_conv",
             "chunk_size": "chunk_size", "layer_norm_epsilon": "norm_eps", "use_bias": "proj_bias",
             "use_conv_bias": "conv_bias", "residual_in_fp32": "residual_in_fp32",
             "tie_word_embeddings": "tie_embeddings"}


def hf_config(ucfg: dict, base: dict | None = None) -> dict:
    """A ``config.json`` for ``Mamba2ForCausalLM``; ``base`` (the source's own config) keeps its other fields."""
    d, d_inner = ucfg["d_model"], ucfg["n_heads"] * ucfg["head_dim"]
    if d_inner % d:
        raise StatecastError(f"Mamba2ForCausalLM needs n_heads * head_dim a multiple of d_model, got {d_inner} and {d}")
    if ucfg["norm_before_gate"]:
        raise StatecastError("this model normalises before the gate; Mamba2ForCausalLM always gates first")
    defaults = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "use_cache": True, "hidden_act": "silu"}
    return write_hf_config(ucfg, base, defaults, "Mamba2ForCausalLM", "mamba2", HF_FIELDS,
                           expand=d_inner // d, time_step_limit=_dt_limit_json(ucfg))


# ----------------------------------------------------------------------------- native state-spaces

# mamba_ssm's Mamba2 module arguments (ssm_cfg) and what this family does with each
_SSM_CFG_KEYS = {"layer", "d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
                 "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias",
                 "conv_bias", "chunk_size", "use_mem_eff_path"}
# defaults of mamba_ssm.modules.mamba2.Mamba2 where ssm_cfg is silent
NATIVE_DEFAULTS = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256,
                   "rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False, "dt_limit": (0.0, math.inf)}


def _unsupported_variant(keys: list[str], cfg: dict | None) -> str | None:
    """Why a state-spaces Mamba-2 checkpoint is not the model this family reads, or None."""
    cfg = cfg or {}
    ssm = cfg.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        return f"ssm_cfg must be an object, got {ssm!r:.60}"
    if not any(k.startswith("backbone.layers.") and k.endswith(".mixer.dt_bias") for k in keys):
        return "ssm_cfg.layer 'Mamba2' but the mixers hold no mixer.dt_bias (Mamba-1 tensors?)"
    unknown = sorted(set(ssm) - _SSM_CFG_KEYS)
    if unknown:
        return f"ssm_cfg has keys this Mamba-2 reader does not know: {', '.join(map(str, unknown))}"
    if cfg.get("d_intermediate", 0):
        return f"d_intermediate={cfg['d_intermediate']} (an MLP after every Mamba-2 mixer) is not supported"
    if cfg.get("attn_layer_idx"):
        return "hybrid state-spaces checkpoints (attn_layer_idx) are not supported"
    if not cfg.get("rms_norm", True):
        return "rms_norm=false (LayerNorm) state-spaces checkpoints are not supported"
    if not ssm.get("rmsnorm", True):
        return "ssm_cfg.rmsnorm=false (Mamba-2 without its gated norm) is not supported"
    if ssm.get("norm_before_gate", False):
        return "ssm_cfg.norm_before_gate=true is not supported (transformers' Mamba2, the reference, gates first)"
    if ssm.get("D_has_hdim", False):
        return "ssm_cfg.D_has_hdim=true (a D per channel) is not supported"
    if ssm.get("d_ssm") is not None:
        return "ssm_cfg.d_ssm (a gated MLP beside the SSM) is not supported"
    return None


def is_native(keys: list[str], cfg: dict | None = None) -> bool:
    return _looks_native(keys) and state_spaces_layer(keys, cfg) == "Mamba2" and _unsupported_variant(keys, cfg) is None


def native_near_miss(keys: list[str], cfg: dict | None = None) -> str | None:
    if not _looks_native(keys) or state_spaces_layer(keys, cfg) != "Mamba2":
        return None
    return _unsupported_variant(keys, cfg)


def config_from_native(shapes: dict[str, tuple[int, ...]], cfg: dict | None) -> dict:
    """state-spaces ``config.json`` (``d_model``, ``n_layer``, ``ssm_cfg``...) plus the tensor shapes.

    The shapes give every dimension but the split of 2 G N between groups and state size
    (``ngroups``, mamba_ssm's default 1 when silent); the config values that the shapes also
    give must agree with them.
    """
    cfg = cfg or {}  # its variant was checked by detection (native_near_miss)
    ssm = {**NATIVE_DEFAULTS, **(cfg.get("ssm_cfg") or {})}
    n_layer = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("backbone.layers."))
    vocab, d = shapes["backbone.embedding.weight"]
    mixer = "backbone.layers.0.mixer."
    H = shapes[mixer + "A_log"][0]
    E = shapes[mixer + "out_proj.weight"][1]
    Dc, _, W = shapes[mixer + "conv1d.weight"]
    G = ssm["ngroups"]
    if not isinstance(G, int) or G < 1 or (Dc - E) % (2 * G) or H % G:
        raise ValueError(f"ssm_cfg.ngroups={G!r} does not divide the weights' {Dc - E} B/C channels and {H} heads")
    N = (Dc - E) // (2 * G)
    P = E // H if H else 0
    seen = {"d_model": (cfg.get("d_model", d), d), "n_layer": (cfg.get("n_layer", n_layer), n_layer),
            "ssm_cfg.headdim": (ssm["headdim"], P), "ssm_cfg.d_state": (ssm["d_state"], N),
            "ssm_cfg.d_conv": (ssm["d_conv"], W)}
    for key, (said, value) in seen.items():
        if said != value:
            raise ValueError(f"config {key}={said} but the weights have {value}")
    if ssm["expand"] * d != E:
        raise ValueError(f"config ssm_cfg.expand={ssm['expand']} but the weights have d_inner {E} for d_model {d}")
    return {
        "vocab_size": vocab,
        "d_model": d,
        "n_layer": n_layer,
        "n_heads": H,
        "head_dim": P,
        "d_state": N,
        "n_groups": G,
        "d_conv": W,
        "chunk_size": ssm["chunk_size"],
        "norm_eps": 1e-5,  # mamba_ssm: create_block's norm_epsilon default and RMSNormGated's eps
        "proj_bias": mixer + "in_proj.bias" in shapes,
        "conv_bias": mixer + "conv1d.bias" in shapes,
        "norm_before_gate": False,
        **dt_limits(ssm["dt_limit"], "ssm_cfg.dt_limit"),
        "residual_in_fp32": bool(cfg.get("residual_in_fp32", True)),
        "tie_embeddings": bool(cfg.get("tie_embeddings", True)),
    }


def native_reference(path: Path, device: torch.device, family: Family, ucfg: dict, dtype: torch.dtype) -> HfReference:
    """verify's reference for a state-spaces Mamba-2 checkpoint: transformers'
    ``Mamba2ForCausalLM`` holding the state-spaces tensors unchanged (``mamba_ssm`` does not
    import without CUDA; transformers' class computes the same function)."""
    return RenamedHfReference(path, device, family.arch(family.native.export_as), ucfg, dtype,
                              renames=NATIVE_MAMBA2_RENAMES, origin="state-spaces")


# ----------------------------------------------------------------------------- demo


def build_hf_mamba2(out: Path, seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 320, heads: int = 8,
                    head_dim: int = 16, groups: int = 2, state: int = 16, chunk: int = 16, fmt: str = "safetensors",
                    tied: bool = False, shard: str | None = None, dtype: torch.dtype | None = None, **extra) -> Path:
    """A seeded ``Mamba2ForCausalLM`` in Hub format with a tokenizer (``extra`` goes to the
    config). The small default chunk makes verify's 64-token prompts span several chunks."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    def make(vocab_size: int):
        return Mamba2ForCausalLM(Mamba2Config(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_heads=heads, head_dim=head_dim,
            expand=heads * head_dim // hidden, n_groups=groups, state_size=state, chunk_size=chunk,
            tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra))

    return seeded_checkpoint(out, make, seed=seed, vocab=vocab, fmt=fmt, shard=shard, dtype=dtype, keep=MAMBA2_INIT)


FAMILY = Family(
    name="mamba2",
    model=("mamba2", "Mamba2Config", "Mamba2"),
    hf=(HfArch("mamba2", "Mamba2ForCausalLM", (HF,), config_from_hf, hf_config),),
    native=NativeFormat(NATIVE, match=is_native, config=config_from_native, reference=native_reference,
                        near_miss=native_near_miss, export_as="mamba2"),
    state=MAMBA_STATE,
    demo=Demo("demo-mamba2", "Mamba-2 (Mamba2ForCausalLM, grouped B/C)", build_hf_mamba2),
)
