"""RWKV-4 checkpoint formats: Hugging Face ``RwkvForCausalLM`` and BlinkDL's native ``.pth``.

Both are plain renames of the same tensors (the HF layout was produced from the
native one by transformers' ``convert_rwkv_checkpoint_to_hf.py``); the only
numeric transform is squeezing the ``[1, 1, C]`` time-mix coefficients to ``[C]``.
"""

from __future__ import annotations

from ..errors import StatecastError
from .tables import Family, HfArch, NativeFormat, Rule, SourceFormat


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.weight"), Rule(f"{src}.bias", f"{dst}.bias")]


def _rules(*, emb: str, ln0: str, block: str, ln1: str, ln2: str, att: str, ffn: str, mix: dict[str, str],
           ln_out: str, head: str) -> tuple[Rule, ...]:
    """One table shape for both formats; only the source spellings differ."""
    b, sq = f"{block}.{{i}}", "squeeze_1_1_c"
    return tuple(
        [Rule(emb, "embed.weight"), *_norm(ln0, "embed_norm"), *_norm(ln_out, "final_norm"), Rule(head, "lm_head.weight")]
        + _norm(f"{b}.{ln1}", "layers.{i}.mixer_norm")
        + _norm(f"{b}.{ln2}", "layers.{i}.mlp_norm")
        + [
            Rule(f"{b}.{att}.time_decay", "layers.{i}.time_mix.decay"),
            Rule(f"{b}.{att}.time_first", "layers.{i}.time_mix.bonus"),
            Rule(f"{b}.{att}.{mix['k']}", "layers.{i}.time_mix.mix_k", sq),
            Rule(f"{b}.{att}.{mix['v']}", "layers.{i}.time_mix.mix_v", sq),
            Rule(f"{b}.{att}.{mix['r']}", "layers.{i}.time_mix.mix_r", sq),
            Rule(f"{b}.{att}.key.weight", "layers.{i}.time_mix.key.weight"),
            Rule(f"{b}.{att}.value.weight", "layers.{i}.time_mix.value.weight"),
            Rule(f"{b}.{att}.receptance.weight", "layers.{i}.time_mix.receptance.weight"),
            Rule(f"{b}.{att}.output.weight", "layers.{i}.time_mix.output.weight"),
            Rule(f"{b}.{ffn}.{mix['k']}", "layers.{i}.mlp.mix_k", sq),
            Rule(f"{b}.{ffn}.{mix['r']}", "layers.{i}.mlp.mix_r", sq),
            Rule(f"{b}.{ffn}.key.weight", "layers.{i}.mlp.up.weight"),
            Rule(f"{b}.{ffn}.value.weight", "layers.{i}.mlp.down.weight"),
            Rule(f"{b}.{ffn}.receptance.weight", "layers.{i}.mlp.receptance.weight"),
        ]
    )


HF = SourceFormat(
    name="rwkv-hf",
    family="rwkv",
    rules=_rules(
        emb="rwkv.embeddings.weight", ln0="rwkv.blocks.0.pre_ln", block="rwkv.blocks", ln1="ln1", ln2="ln2",
        att="attention", ffn="feed_forward",
        mix={"k": "time_mix_key", "v": "time_mix_value", "r": "time_mix_receptance"},
        ln_out="rwkv.ln_out", head="head.weight",
    ),
)

NATIVE = SourceFormat(
    name="rwkv-native",
    family="rwkv",
    rules=_rules(
        emb="emb.weight", ln0="blocks.0.ln0", block="blocks", ln1="ln1", ln2="ln2", att="att", ffn="ffn",
        mix={"k": "time_mix_k", "v": "time_mix_v", "r": "time_mix_r"},
        ln_out="ln_out", head="head.weight",
    ),
)

# Markers of later RWKV generations in native checkpoints (BlinkDL's rwkv package
# uses the same markers to tell versions apart).
# A marker matches the start of one dotted segment of a tensor name.
_LATER_VERSIONS = {"ln_x": "RWKV-5", "gate": "RWKV-5.x", "time_maa": "RWKV-6", "time_faaaa": "RWKV-6", "x_r": "RWKV-7"}


def is_native(keys: list[str]) -> bool:
    return "emb.weight" in keys and any(k.startswith("blocks.") and ".att." in k for k in keys)


def check_native_version(keys: list[str], where: str) -> None:
    for k in keys:
        for marker, version in _LATER_VERSIONS.items():
            if any(seg.startswith(marker) for seg in k.split(".")):
                raise StatecastError(f"{where}: {version} native checkpoints are not supported (found {k}); RWKV-4 only")


def config_from_hf(cfg: dict) -> dict:
    d = cfg["hidden_size"]
    return {
        "vocab_size": cfg["vocab_size"],
        "d_model": d,
        "n_layer": cfg["num_hidden_layers"],
        "d_attn": cfg.get("attention_hidden_size") or d,
        "d_ffn": cfg.get("intermediate_size") or 4 * d,
        "norm_eps": cfg.get("layer_norm_epsilon", 1e-5),
        "final_norm_eps": 1e-5,  # transformers builds ln_out with LayerNorm's default eps
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def config_from_native(shapes: dict[str, tuple[int, ...]], cfg: dict | None = None) -> dict:
    """Native ``.pth`` files carry no config: read the dimensions off the tensors."""
    n_layer = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    vocab, d = shapes["emb.weight"]
    return {
        "vocab_size": vocab,
        "d_model": d,
        "n_layer": n_layer,
        "d_attn": shapes["blocks.0.att.key.weight"][0],
        "d_ffn": shapes["blocks.0.ffn.key.weight"][0],
        "norm_eps": 1e-5,
        "final_norm_eps": 1e-5,
        "tie_embeddings": "head.weight" not in shapes,
    }


def hf_config(ucfg: dict, base: dict | None = None) -> dict:
    """A ``config.json`` for ``RwkvForCausalLM``; ``base`` (the source's own config) keeps its other fields."""
    cfg = dict(base or {"bos_token_id": 0, "eos_token_id": 0, "context_length": 1024, "rescale_every": 6, "use_cache": True})
    cfg.update(
        architectures=["RwkvForCausalLM"],
        model_type="rwkv",
        vocab_size=ucfg["vocab_size"],
        hidden_size=ucfg["d_model"],
        num_hidden_layers=ucfg["n_layer"],
        attention_hidden_size=ucfg["d_attn"],
        intermediate_size=ucfg["d_ffn"],
        layer_norm_epsilon=ucfg["norm_eps"],
        tie_word_embeddings=ucfg["tie_embeddings"],
    )
    return cfg


# Kept in float32 whatever --dtype says: the WKV decay and bonus feed exp(), as
# transformers' `_keep_in_fp32_modules = ["time_decay", "time_first"]` does.
KEEP_FP32 = ("time_mix.decay", "time_mix.bonus")


FAMILY = Family(
    name="rwkv",
    hf=(HfArch("rwkv", "RwkvForCausalLM", (HF,), config_from_hf, hf_config, reference_kwargs=(("rescale_every", 0),)),),
    native=NativeFormat(NATIVE, match=is_native, config=config_from_native, check=check_native_version, export_as="rwkv"),
    keep_fp32=KEEP_FP32,
)
