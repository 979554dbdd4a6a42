"""Mamba-1 checkpoint formats: Hugging Face ``MambaForCausalLM`` / ``FalconMambaForCausalLM``
and the native state-spaces format (``mamba_ssm``'s ``MambaLMHeadModel``).

All three hold the same tensors under nearly the same names; no numeric transform
is needed (``A_log`` is kept as stored: converting it to ``A = -exp(A_log)`` and back
is not bit-exact, and the round trip to Hub format must be).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import StatecastError
from .builders import MAMBA_INIT, seeded_checkpoint
from .record import MAMBA_STATE, Demo, Family, HfArch, NativeFormat, write_hf_config
from .references import HfReference, RenamedHfReference
from .tables import Rule, SourceFormat

MIXER_TENSORS = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                 "dt_proj.bias", "A_log", "D", "out_proj.weight", "out_proj.bias")


def backbone_rules(embedding: str, mixer: tuple[str, ...] = MIXER_TENSORS) -> tuple[Rule, ...]:
    """The ``backbone.*`` names of transformers' Mamba classes and of the state-spaces files
    (which differ in the embedding's name); ``mixer``: the mixer's tensors (Mamba-2's differ)."""
    layer = "backbone.layers.{i}"
    return (
        Rule(f"backbone.{embedding}.weight", "embed.weight"),
        Rule(f"{layer}.norm.weight", "layers.{i}.mixer_norm.weight"),
        *(Rule(f"{layer}.mixer.{t}", f"layers.{{i}}.mamba.{t}") for t in mixer),
        Rule("backbone.norm_f.weight", "final_norm.weight"),
        Rule("lm_head.weight", "lm_head.weight"),
    )


HF = SourceFormat("mamba-hf", backbone_rules("embeddings"), optional=("lm_head.weight",))
FALCON_HF = SourceFormat("falcon-mamba-hf", backbone_rules("embeddings"), optional=("lm_head.weight",))
NATIVE = SourceFormat("mamba-native", backbone_rules("embedding"), optional=("lm_head.weight",))


def dt_rank_of(rank, d_model: int) -> int:
    """``time_step_rank`` / ``mamba_dt_rank``: a number, or "auto" (or None) for ceil(d_model / 16)."""
    return math.ceil(d_model / 16) if rank in (None, "auto") else int(rank)


def config_from_hf(cfg: dict) -> dict:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (Mamba uses silu)")
    d = cfg["hidden_size"]
    return {
        "vocab_size": cfg["vocab_size"],
        "d_model": d,
        "n_layer": cfg["num_hidden_layers"],
        "d_inner": cfg.get("intermediate_size") or int(cfg.get("expand", 2) * d),
        "d_state": cfg.get("state_size", 16),
        "d_conv": cfg.get("conv_kernel", 4),
        "dt_rank": dt_rank_of(cfg.get("time_step_rank"), d),
        "norm_eps": cfg.get("layer_norm_epsilon", 1e-5),
        "proj_bias": bool(cfg.get("use_bias", False)),
        "conv_bias": bool(cfg.get("use_conv_bias", True)),
        "residual_in_fp32": bool(cfg.get("residual_in_fp32", True)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)),
    }


def falcon_config_from_hf(cfg: dict) -> dict:
    return {**config_from_hf(cfg), "bcdt_norm": "rms", "bcdt_norm_eps": cfg.get("mixer_rms_eps", 1e-6)}


# config.json key -> unified key, for the fields that map one to one
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layer",
             "intermediate_size": "d_inner", "state_size": "d_state", "conv_kernel": "d_conv", "time_step_rank": "dt_rank",
             "layer_norm_epsilon": "norm_eps", "use_bias": "proj_bias", "use_conv_bias": "conv_bias",
             "residual_in_fp32": "residual_in_fp32", "tie_word_embeddings": "tie_embeddings"}


def hf_config(ucfg: dict, base: dict | None = None, *, model_type: str = "mamba", architecture: str = "MambaForCausalLM") -> dict:
    """A ``config.json`` for ``MambaForCausalLM``; ``base`` (the source's own config) keeps its other fields."""
    d, d_inner = ucfg["d_model"], ucfg["d_inner"]
    defaults = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "use_cache": True, "hidden_act": "silu"}
    return write_hf_config(ucfg, base, defaults, architecture, model_type, HF_FIELDS,
                           expand=d_inner // d if d_inner % d == 0 else d_inner / d)


def falcon_hf_config(ucfg: dict, base: dict | None = None) -> dict:
    cfg = hf_config(ucfg, base, model_type="falcon_mamba", architecture="FalconMambaForCausalLM")
    cfg["mixer_rms_eps"] = ucfg["bcdt_norm_eps"]
    return cfg


def mamba_only_hf_config(ucfg: dict, base: dict | None = None) -> dict:
    if ucfg.get("bcdt_norm", "none") != "none":
        raise StatecastError("this model normalises dt/B/C; export it as falcon_mamba (MambaForCausalLM cannot hold it)")
    return hf_config(ucfg, base)


def _looks_native(keys: list[str]) -> bool:
    """state-spaces names: ``backbone.embedding`` and mixers with ``A_log`` (Mamba-1 and Mamba-2 alike)."""
    return "backbone.embedding.weight" in keys and any(k.startswith("backbone.layers.") and ".mixer.A_log" in k for k in keys)


def state_spaces_layer(keys: list[str], cfg: dict | None) -> str:
    """The mixer of a state-spaces checkpoint: ``ssm_cfg.layer`` when the config names it, else
    "Mamba2" when the mixers have ``dt_bias`` (Mamba-2's per-head dt bias) and "Mamba1"
    otherwise. The one rule that splits these checkpoints between the mamba and mamba2 families."""
    ssm = (cfg or {}).get("ssm_cfg") or {}
    if "layer" in ssm:
        return ssm["layer"]
    return "Mamba2" if any(k.startswith("backbone.layers.") and k.endswith(".mixer.dt_bias") for k in keys) else "Mamba1"


def _unsupported_variant(keys: list[str], cfg: dict | None) -> str | None:
    """Why a state-spaces checkpoint is not the Mamba-1 model this family reads, or None."""
    cfg = cfg or {}
    layer = state_spaces_layer(keys, cfg)
    if layer != "Mamba1":
        return f"ssm_cfg.layer {layer!r} is not supported (Mamba1 and Mamba2 are)"
    if cfg.get("attn_layer_idx"):
        return "hybrid state-spaces checkpoints (attn_layer_idx) are not supported"
    if not cfg.get("rms_norm", True):
        return "rms_norm=false (LayerNorm) state-spaces checkpoints are not supported"
    if not any(k.endswith(".mixer.x_proj.weight") for k in keys):
        return "a state-spaces checkpoint without mixer.x_proj (not Mamba-1) is not supported"
    return None


def is_native(keys: list[str], cfg: dict | None = None) -> bool:
    return _looks_native(keys) and _unsupported_variant(keys, cfg) is None


def native_near_miss(keys: list[str], cfg: dict | None = None) -> str | None:
    # a Mamba-2 checkpoint is the mamba2 family's to accept or refuse
    if not _looks_native(keys) or state_spaces_layer(keys, cfg) == "Mamba2":
        return None
    return _unsupported_variant(keys, cfg)


def config_from_native(shapes: dict[str, tuple[int, ...]], cfg: dict | None) -> dict:
    """state-spaces ``config.json`` (``d_model``, ``n_layer``, ``ssm_cfg``, ...) plus the tensor shapes.

    The shapes are authoritative for every dimension (``pad_vocab_size_multiple`` has
    already padded the embedding); the config says what the shapes cannot.
    """
    cfg = cfg or {}  # its variant was checked by detection (native_near_miss)
    n_layer = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("backbone.layers."))
    vocab, d = shapes["backbone.embedding.weight"]
    for key, value in (("d_model", d), ("n_layer", n_layer)):
        if key in cfg and cfg[key] != value:
            raise ValueError(f"config {key}={cfg[key]} but the weights have {value}")
    mixer = "backbone.layers.0.mixer."
    return {
        "vocab_size": vocab,
        "d_model": d,
        "n_layer": n_layer,
        "d_inner": shapes[mixer + "in_proj.weight"][0] // 2,
        "d_state": shapes[mixer + "A_log"][1],
        "d_conv": shapes[mixer + "conv1d.weight"][2],
        "dt_rank": shapes[mixer + "dt_proj.weight"][1],
        "norm_eps": 1e-5,  # mamba_ssm's create_block default (norm_epsilon)
        "proj_bias": mixer + "in_proj.bias" in shapes,
        "conv_bias": mixer + "conv1d.bias" in shapes,
        "residual_in_fp32": bool(cfg.get("residual_in_fp32", True)),
        "tie_embeddings": bool(cfg.get("tie_embeddings", True)),
    }


# The only native name that differs from transformers' MambaForCausalLM.
NATIVE_MAMBA_RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def native_reference(path: Path, device: torch.device, family: Family, ucfg: dict, dtype: torch.dtype) -> HfReference:
    """verify's reference for a state-spaces checkpoint: transformers' ``MambaForCausalLM``
    holding the state-spaces tensors unchanged (``mamba_ssm``, the native implementation,
    does not import without CUDA; transformers' class computes the same function)."""
    return RenamedHfReference(path, device, family.arch(family.native.export_as), ucfg, dtype,
                              renames=NATIVE_MAMBA_RENAMES, origin="state-spaces")


def build_hf_mamba(out: Path, seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 320, state: int = 8,
                   fmt: str = "safetensors", tied: bool = True, falcon: bool = False, shard: str | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """A seeded ``MambaForCausalLM`` (or ``FalconMambaForCausalLM``) in Hub format with a tokenizer."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM, MambaConfig, MambaForCausalLM

    cfg_cls, model_cls = (FalconMambaConfig, FalconMambaForCausalLM) if falcon else (MambaConfig, MambaForCausalLM)

    def make(vocab_size: int):
        return model_cls(cfg_cls(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, state_size=state,
                                 tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0))

    return seeded_checkpoint(out, make, seed=seed, vocab=vocab, fmt=fmt, shard=shard, dtype=dtype, keep=MAMBA_INIT)


FAMILY = Family(
    name="mamba",
    model=("mamba", "MambaConfig", "Mamba"),
    hf=(
        HfArch("mamba", "MambaForCausalLM", (HF,), config_from_hf, mamba_only_hf_config),
        HfArch("falcon_mamba", "FalconMambaForCausalLM", (FALCON_HF,), falcon_config_from_hf, falcon_hf_config),
    ),
    native=NativeFormat(NATIVE, match=is_native, config=config_from_native, reference=native_reference,
                        near_miss=native_near_miss, export_as="mamba"),
    state=MAMBA_STATE,
    demo=Demo("demo-mamba", "Mamba (MambaForCausalLM)", build_hf_mamba),
    kernels=("torch", "compiled"),
)
