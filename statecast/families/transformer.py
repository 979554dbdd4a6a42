"""Decoder-only Transformer checkpoint formats: GPT-2 and the Llama family.

GPT-2 (``GPT2LMHeadModel``) stores its linear layers as ``Conv1D`` ([in, out]) and
fuses the attention input projection (``c_attn`` = q|k|v): the table transposes to
``nn.Linear``'s [out, in] and splits ``c_attn`` into q, k and v, so attention and MLP
tensors carry the same canonical names in every family. The Llama family
(``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``) shares one name
table; the architectures differ only in config flags (biases, sliding window).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..arch.layers import ACTIVATIONS, ROPE_TYPES
from ..errors import StatecastError
from .builders import seeded_checkpoint
from .record import KV_STATE, Demo, Family, HfArch, write_hf_config
from .tables import Rule, SourceFormat


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.weight"), Rule(f"{src}.bias", f"{dst}.bias")]


def _linear(src: str, dst: str, transform: str = "identity") -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.weight", transform), Rule(f"{src}.bias", f"{dst}.bias")]


def _gpt2_rules(prefix: str) -> tuple[Rule, ...]:
    h, out = f"{prefix}h.{{i}}", "layers.{i}"
    qkv = tuple(f"{out}.attn.{p}" for p in "qkv")
    return (
        Rule(f"{prefix}wte.weight", "embed.weight"),
        Rule(f"{prefix}wpe.weight", "pos_embed.weight"),
        *_norm(f"{h}.ln_1", f"{out}.mixer_norm"),
        Rule(f"{h}.attn.c_attn.weight", tuple(f"{n}.weight" for n in qkv), "conv1d_qkv"),
        Rule(f"{h}.attn.c_attn.bias", tuple(f"{n}.bias" for n in qkv), "split_qkv"),
        *_linear(f"{h}.attn.c_proj", f"{out}.attn.o", "conv1d"),
        *_norm(f"{h}.ln_2", f"{out}.mlp_norm"),
        *_linear(f"{h}.mlp.c_fc", f"{out}.mlp.up", "conv1d"),
        *_linear(f"{h}.mlp.c_proj", f"{out}.mlp.down", "conv1d"),
        *_norm(f"{prefix}ln_f", "final_norm"),
        Rule("lm_head.weight", "lm_head.weight"),
    )


# Causal-mask buffers that older transformers versions saved with the weights.
_GPT2_BUFFERS = ("h.{i}.attn.bias", "h.{i}.attn.masked_bias")

GPT2 = SourceFormat("gpt2-hf", _gpt2_rules("transformer."),
                    dropped=tuple("transformer." + b for b in _GPT2_BUFFERS), optional=("lm_head.weight",))
# openai-community/gpt2 and other early uploads were saved from GPT2Model: no "transformer." prefix.
GPT2_BARE = SourceFormat("gpt2-hf-bare", _gpt2_rules(""), dropped=_GPT2_BUFFERS,
                         optional=("lm_head.weight",))


def _llama_rules() -> tuple[Rule, ...]:
    h, out = "model.layers.{i}", "layers.{i}"
    return (
        Rule("model.embed_tokens.weight", "embed.weight"),
        Rule(f"{h}.input_layernorm.weight", f"{out}.mixer_norm.weight"),
        *(r for p in "qkvo" for r in _linear(f"{h}.self_attn.{p}_proj", f"{out}.attn.{p}")),
        Rule(f"{h}.post_attention_layernorm.weight", f"{out}.mlp_norm.weight"),
        *(r for p in ("gate", "up", "down") for r in _linear(f"{h}.mlp.{p}_proj", f"{out}.mlp.{p}")),
        Rule("model.norm.weight", "final_norm.weight"),
        Rule("lm_head.weight", "lm_head.weight"),
    )


def _llama_format(name: str) -> SourceFormat:
    # rotary_emb.inv_freq: a buffer that checkpoints from before transformers 4.31 contain.
    return SourceFormat(name, _llama_rules(), dropped=("model.layers.{i}.self_attn.rotary_emb.inv_freq",),
                        optional=("lm_head.weight",))


LLAMA, MISTRAL, QWEN2 = _llama_format("llama-hf"), _llama_format("mistral-hf"), _llama_format("qwen2-hf")


# --------------------------------------------------------------------------- configs


def gpt2_config_from_hf(cfg: dict) -> dict:
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("scale_attn_by_inverse_layer_idx=true is not supported")
    d, heads = cfg["n_embd"], cfg["n_head"]
    return {
        "vocab_size": cfg["vocab_size"],
        "d_model": d,
        "n_layer": cfg["n_layer"],
        "n_head": heads,
        "n_kv_head": heads,
        "head_dim": d // heads,
        "d_ffn": cfg.get("n_inner") or 4 * d,
        "norm": "layernorm",
        "norm_eps": cfg.get("layer_norm_epsilon", 1e-5),
        "mlp": "plain",
        "act": cfg.get("activation_function", "gelu_new"),
        "positions": "learned",
        "max_positions": cfg.get("n_positions", 1024),
        "qkv_bias": True,
        "o_bias": True,
        "mlp_bias": True,
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        "attn_scale": None if cfg.get("scale_attn_weights", True) else 1.0,
    }


# config.json key -> unified key, for the fields that map one to one
GPT2_FIELDS = {"vocab_size": "vocab_size", "n_embd": "d_model", "n_layer": "n_layer", "n_head": "n_head", "n_inner": "d_ffn",
               "n_positions": "max_positions", "layer_norm_epsilon": "norm_eps", "activation_function": "act",
               "tie_word_embeddings": "tie_embeddings"}
LLAMA_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layer",
                "num_attention_heads": "n_head", "num_key_value_heads": "n_kv_head", "head_dim": "head_dim",
                "intermediate_size": "d_ffn", "rms_norm_eps": "norm_eps", "hidden_act": "act",
                "max_position_embeddings": "max_positions", "tie_word_embeddings": "tie_embeddings"}


def gpt2_hf_config(ucfg: dict, base: dict | None = None) -> dict:
    return write_hf_config(ucfg, base, {"bos_token_id": 50256, "eos_token_id": 50256, "use_cache": True},
                           "GPT2LMHeadModel", "gpt2", GPT2_FIELDS, scale_attn_weights=ucfg["attn_scale"] is None)


def rope_from_hf(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either spelling: transformers 5's ``rope_parameters`` or the
    older top-level ``rope_theta`` + ``rope_scaling``."""
    params = cfg.get("rope_parameters") or {}
    scaling = dict(cfg.get("rope_scaling") or {})
    if params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return float(theta), None
    scaling.pop("type", None)
    return float(theta), {**scaling, "rope_type": kind}


def llama_config_from_hf(cfg: dict) -> dict:
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("hidden_act", "silu") not in ACTIVATIONS:
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    theta, scaling = rope_from_hf(cfg)
    bias = bool(cfg.get("attention_bias", False))
    return {
        "vocab_size": cfg["vocab_size"],
        "d_model": d,
        "n_layer": cfg["num_hidden_layers"],
        "n_head": heads,
        "n_kv_head": cfg.get("num_key_value_heads") or heads,
        "head_dim": cfg.get("head_dim") or d // heads,
        "d_ffn": cfg["intermediate_size"],
        "norm": "rmsnorm",
        "norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "mlp": "gated",
        "act": cfg.get("hidden_act", "silu"),
        "positions": "rope",
        "max_positions": cfg.get("max_position_embeddings", 2048),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "qkv_bias": bias,
        "o_bias": bias,
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def mistral_config_from_hf(cfg: dict) -> dict:
    return {**llama_config_from_hf(cfg), "sliding_window": cfg.get("sliding_window")}


def qwen2_config_from_hf(cfg: dict) -> dict:
    if cfg.get("use_sliding_window"):
        raise ValueError("Qwen2 use_sliding_window=true (per-layer windows) is not supported")
    return {**llama_config_from_hf(cfg), "qkv_bias": True, "o_bias": False}


def llama_hf_config(ucfg: dict, base: dict | None = None, *, model_type: str = "llama",
                    architecture: str = "LlamaForCausalLM") -> dict:
    base = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")} if base else None  # now rope_parameters
    scaling = ucfg.get("rope_scaling") or {"rope_type": "default"}
    extra = {"rope_parameters": {**scaling, "rope_theta": ucfg["rope_theta"]}}
    if model_type == "llama":
        extra.update(attention_bias=ucfg["qkv_bias"], mlp_bias=ucfg["mlp_bias"])
    if model_type == "mistral":
        extra["sliding_window"] = ucfg.get("sliding_window")
    return write_hf_config(ucfg, base, {"bos_token_id": 1, "eos_token_id": 2, "use_cache": True}, architecture, model_type,
                           LLAMA_FIELDS, **extra)


def mistral_hf_config(ucfg: dict, base: dict | None = None) -> dict:
    return llama_hf_config(ucfg, base, model_type="mistral", architecture="MistralForCausalLM")


def qwen2_hf_config(ucfg: dict, base: dict | None = None) -> dict:
    return llama_hf_config(ucfg, base, model_type="qwen2", architecture="Qwen2ForCausalLM")


def build_hf_transformer(out: Path, style: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 3,
                         vocab: int = 320, heads: int = 4, kv_heads: int = 2, fmt: str = "safetensors",
                         tied: bool = False, shard: str | None = None, dtype: torch.dtype | None = None,
                         **extra) -> Path:
    """A seeded ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
    ``Qwen2ForCausalLM`` in Hub format with a tokenizer. ``extra`` goes to the config."""
    import transformers

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
    if style not in names and style != "gpt2":
        raise StatecastError(f"unknown transformer style {style!r}; choose gpt2, {', '.join(names)}")

    def make(v: int):
        if style == "gpt2":
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=v, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256, tie_word_embeddings=tied,
                bos_token_id=0, eos_token_id=0, **extra))
        cfg = getattr(transformers, names[style] + "Config")(
            vocab_size=v, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, intermediate_size=2 * hidden + 32, max_position_embeddings=512,
            tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, **extra)
        return getattr(transformers, names[style] + "ForCausalLM")(cfg)

    return seeded_checkpoint(out, make, seed=seed, vocab=vocab, fmt=fmt, shard=shard, dtype=dtype)


FAMILY = Family(
    name="transformer",
    model=("transformer", "TransformerConfig", "Transformer"),
    hf=(
        # onnxruntime-genai's "gpt2" type wants its own older GPT-2 graph (attention_mask input,
        # one combined past per layer); ours runs as its generic "decoder"
        HfArch("gpt2", "GPT2LMHeadModel", (GPT2, GPT2_BARE), gpt2_config_from_hf, gpt2_hf_config, genai_type="decoder"),
        HfArch("llama", "LlamaForCausalLM", (LLAMA,), llama_config_from_hf, llama_hf_config, genai_type="llama"),
        HfArch("mistral", "MistralForCausalLM", (MISTRAL,), mistral_config_from_hf, mistral_hf_config, genai_type="mistral"),
        HfArch("qwen2", "Qwen2ForCausalLM", (QWEN2,), qwen2_config_from_hf, qwen2_hf_config, genai_type="qwen2"),
    ),
    state=KV_STATE,
    demo=Demo("demo-llama", "Llama with grouped-query attention (LlamaForCausalLM)", build_hf_transformer),
    # one causal attention over past + new positions, the mask built from shapes: one graph for every T
    onnx_dynamic_length=True,
)
