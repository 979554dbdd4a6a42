"""Mamba-1 checkpoint formats: Hugging Face ``MambaForCausalLM`` / ``FalconMambaForCausalLM``
and the native state-spaces format (``mamba_ssm``'s ``MambaLMHeadModel``).

All three hold the same tensors under nearly the same names; no numeric transform
is needed (``A_log`` is kept as stored: converting it to ``A = -exp(A_log)`` and back
is not bit-exact, and the round trip to Hub format must be).
"""

from __future__ import annotations

import math

from ..errors import StatecastError
from .tables import Family, HfArch, NativeFormat, Rule, SourceFormat

MIXER_TENSORS = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                 "dt_proj.bias", "A_log", "D", "out_proj.weight", "out_proj.bias")


def _rules(embedding: str) -> tuple[Rule, ...]:
    layer = "backbone.layers.{i}"
    return (
        Rule(f"backbone.{embedding}.weight", "embed.weight"),
        Rule(f"{layer}.norm.weight", "layers.{i}.mixer_norm.weight"),
        *(Rule(f"{layer}.mixer.{t}", f"layers.{{i}}.mamba.{t}") for t in MIXER_TENSORS),
        Rule("backbone.norm_f.weight", "final_norm.weight"),
        Rule("lm_head.weight", "lm_head.weight"),
    )


HF = SourceFormat("mamba-hf", "mamba", _rules("embeddings"), optional=("lm_head.weight",))
FALCON_HF = SourceFormat("falcon-mamba-hf", "mamba", _rules("embeddings"), optional=("lm_head.weight",))
NATIVE = SourceFormat("mamba-native", "mamba", _rules("embedding"), optional=("lm_head.weight",))


def _dt_rank(rank, d_model: int) -> int:
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
        "dt_rank": _dt_rank(cfg.get("time_step_rank"), d),
        "norm_eps": cfg.get("layer_norm_epsilon", 1e-5),
        "proj_bias": bool(cfg.get("use_bias", False)),
        "conv_bias": bool(cfg.get("use_conv_bias", True)),
        "residual_in_fp32": bool(cfg.get("residual_in_fp32", True)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)),
    }


def falcon_config_from_hf(cfg: dict) -> dict:
    return {**config_from_hf(cfg), "bcdt_norm": "rms", "bcdt_norm_eps": cfg.get("mixer_rms_eps", 1e-6)}


def hf_config(ucfg: dict, base: dict | None = None, *, model_type: str = "mamba", architecture: str = "MambaForCausalLM") -> dict:
    """A ``config.json`` for ``MambaForCausalLM``; ``base`` (the source's own config) keeps its other fields."""
    d, d_inner = ucfg["d_model"], ucfg["d_inner"]
    cfg = dict(base or {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "use_cache": True, "hidden_act": "silu"})
    cfg.update(
        architectures=[architecture],
        model_type=model_type,
        vocab_size=ucfg["vocab_size"],
        hidden_size=d,
        num_hidden_layers=ucfg["n_layer"],
        intermediate_size=d_inner,
        expand=d_inner // d if d_inner % d == 0 else d_inner / d,
        state_size=ucfg["d_state"],
        conv_kernel=ucfg["d_conv"],
        time_step_rank=ucfg["dt_rank"],
        layer_norm_epsilon=ucfg["norm_eps"],
        use_bias=ucfg["proj_bias"],
        use_conv_bias=ucfg["conv_bias"],
        residual_in_fp32=ucfg["residual_in_fp32"],
        tie_word_embeddings=ucfg["tie_embeddings"],
    )
    return cfg


def falcon_hf_config(ucfg: dict, base: dict | None = None) -> dict:
    cfg = hf_config(ucfg, base, model_type="falcon_mamba", architecture="FalconMambaForCausalLM")
    cfg["mixer_rms_eps"] = ucfg["bcdt_norm_eps"]
    return cfg


def mamba_only_hf_config(ucfg: dict, base: dict | None = None) -> dict:
    if ucfg.get("bcdt_norm", "none") != "none":
        raise StatecastError("this model normalises dt/B/C; export it as falcon_mamba (MambaForCausalLM cannot hold it)")
    return hf_config(ucfg, base)


def is_native(keys: list[str]) -> bool:
    return "backbone.embedding.weight" in keys and any(k.startswith("backbone.layers.") and ".mixer.A_log" in k for k in keys)


def config_from_native(shapes: dict[str, tuple[int, ...]], cfg: dict | None) -> dict:
    """state-spaces ``config.json`` (``d_model``, ``n_layer``, ``ssm_cfg``, ...) plus the tensor shapes.

    The shapes are authoritative for every dimension (``pad_vocab_size_multiple`` has
    already padded the embedding); the config says what the shapes cannot.
    """
    cfg = cfg or {}
    ssm = cfg.get("ssm_cfg") or {}
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise ValueError(f"ssm_cfg.layer {ssm['layer']!r} is not supported (Mamba-1 only)")
    if cfg.get("attn_layer_idx"):
        raise ValueError("hybrid state-spaces checkpoints (attn_layer_idx) are not supported")
    if not cfg.get("rms_norm", True):
        raise ValueError("rms_norm=false (LayerNorm) state-spaces checkpoints are not supported")
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


FAMILY = Family(
    name="mamba",
    hf=(
        HfArch("mamba", "MambaForCausalLM", (HF,), config_from_hf, mamba_only_hf_config),
        HfArch("falcon_mamba", "FalconMambaForCausalLM", (FALCON_HF,), falcon_config_from_hf, falcon_hf_config),
    ),
    native=NativeFormat(NATIVE, match=is_native, config=config_from_native, export_as="mamba"),
)
