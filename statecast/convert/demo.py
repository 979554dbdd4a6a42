"""``convert demo``: the whole chain offline on small seeded models built with transformers.

One builder per family (``DEMO_BUILDERS``); each saves a checkpoint in Hub format
with a tokenizer, exactly what a Hub repo holds. The tests build their fixtures with
the same functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints import store
from ..errors import StatecastError

CORPUS = (
    "statecast converts checkpoints of sequence models into one unified layout. "
    "It proves that the converted model gives the same logits as the original implementation, "
    "and it runs recurrent models one token at a time with constant memory. "
    "The quick brown fox jumps over the lazy dog while the state carries everything it has seen. "
) * 4


def build_tokenizer(vocab_size: int):
    """A small byte-level BPE trained on a built-in corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No initial byte alphabet: only the corpus's (ASCII) symbols, so a random model's
    # output decodes to printable text rather than stray partial UTF-8 bytes.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=["<|endoftext|>"])
    tok.train_from_iterator([CORPUS], trainer=trainer)
    return tok


# Mamba parameters whose init carries meaning (S4D-real A_log, D = 1, the inverse-softplus dt
# bias): left as initialised by spread_weights(keep=MAMBA_INIT)
MAMBA_INIT = ("A_log", "D", "dt_proj.bias")


@torch.no_grad()
def spread_weights(model: torch.nn.Module, seed: int, keep: tuple[str, ...] = ()) -> None:
    """Give a freshly initialised model trained-like magnitudes.

    transformers' init (normal with std 0.02) makes nearly uniform logits, whose top-1
    is decided by noise: matrices get std 1/sqrt(fan_in), embeddings std 1, norm weights
    1 + N(0, 0.1), biases N(0, 0.1). Parameters whose names end with one of ``keep``
    (e.g. Mamba's A_log, D and dt bias, which have a meaningful init) are left alone.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if any(name.endswith(k) for k in keep):
            continue
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "emb" in name or "wte" in name or "wpe" in name
                                                         else p.shape[-1] ** -0.5))
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        else:
            p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)


def _save(model, tok, out: Path, fmt: str, shard: str | None, dtype: torch.dtype | None) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, safe_serialization=(fmt == "safetensors"), **kwargs)
    tok.save(str(out / "tokenizer.json"))
    return out


def build_hf_checkpoint(out: Path, seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 320,
                        fmt: str = "safetensors", shard: str | None = None) -> Path:
    """A seeded ``RwkvForCausalLM`` saved in Hub format with a tokenizer."""
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(seed)
    tok = build_tokenizer(vocab)
    cfg = RwkvConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                     intermediate_size=4 * hidden, context_length=256, bos_token_id=0, eos_token_id=0)
    return _save(RwkvForCausalLM(cfg), tok, out, fmt, shard, None)


def build_hf_mamba(out: Path, seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 320, state: int = 8,
                   fmt: str = "safetensors", tied: bool = True, falcon: bool = False, shard: str | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """A seeded ``MambaForCausalLM`` (or ``FalconMambaForCausalLM``) in Hub format with a tokenizer."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    tok = build_tokenizer(vocab)
    cfg_cls, model_cls = (FalconMambaConfig, FalconMambaForCausalLM) if falcon else (MambaConfig, MambaForCausalLM)
    cfg = cfg_cls(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers, state_size=state,
                  tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = model_cls(cfg)
    spread_weights(model, seed, keep=MAMBA_INIT)
    return _save(model, tok, out, fmt, shard, dtype)


def build_hf_transformer(out: Path, style: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 3,
                         vocab: int = 320, heads: int = 4, kv_heads: int = 2, fmt: str = "safetensors",
                         tied: bool = False, shard: str | None = None, dtype: torch.dtype | None = None,
                         **extra) -> Path:
    """A seeded ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
    ``Qwen2ForCausalLM`` in Hub format with a tokenizer. ``extra`` goes to the config."""
    import transformers

    torch.manual_seed(seed)
    tok = build_tokenizer(vocab)
    v = tok.get_vocab_size()
    if style == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=v, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                                      tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, **extra)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
        if style not in names:
            raise StatecastError(f"unknown transformer style {style!r}; choose gpt2, {', '.join(names)}")
        cfg = getattr(transformers, names[style] + "Config")(
            vocab_size=v, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, intermediate_size=2 * hidden + 32, max_position_embeddings=512,
            tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, **extra)
        model = getattr(transformers, names[style] + "ForCausalLM")(cfg)
    spread_weights(model, seed)
    return _save(model, tok, out, fmt, shard, dtype)


def build_hf_jamba(out: Path, seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 320, heads: int = 4,
                   kv_heads: int = 2, experts: int = 4, top_k: int = 2, attn_period: int = 2, attn_offset: int = 1,
                   expert_period: int = 2, expert_offset: int = 1, state: int = 8, fmt: str = "safetensors",
                   tied: bool = False, shard: str | None = None, dtype: torch.dtype | None = None, **extra) -> Path:
    """A seeded ``JambaForCausalLM`` in Hub format (one tensor per expert, as on the Hub) with
    a tokenizer. ``extra`` goes to the config."""
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(seed)
    tok = build_tokenizer(vocab)
    cfg = JambaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=2 * hidden + 32,
                      num_experts=experts, num_experts_per_tok=top_k, attn_layer_period=attn_period,
                      attn_layer_offset=attn_offset, expert_layer_period=expert_period, expert_layer_offset=expert_offset,
                      mamba_d_state=state, mamba_expand=2, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0, **extra)
    model = JambaForCausalLM(cfg)
    spread_weights(model, seed, keep=MAMBA_INIT)
    return _save(model, tok, out, fmt, shard, dtype)


DEMO_BUILDERS: dict[str, tuple[str, str, Callable[[Path], Path]]] = {
    # family: (store name, description, builder)
    "rwkv": ("demo-rwkv4", "RWKV-4 (RwkvForCausalLM)", build_hf_checkpoint),
    "mamba": ("demo-mamba", "Mamba (MambaForCausalLM)", build_hf_mamba),
    "transformer": ("demo-llama", "Llama with grouped-query attention (LlamaForCausalLM)", build_hf_transformer),
    "jamba": ("demo-jamba", "Jamba: attention + Mamba layers, mixture of experts (JambaForCausalLM)", build_hf_jamba),
}


def run_demo(families: tuple[str, ...] = tuple(DEMO_BUILDERS), say: Callable[[str], None] = print) -> dict:
    """Build, pull, verify, generate, export to ONNX and generate through onnxruntime for each
    family; sources stay in the store so ``convert verify demo-...`` can be rerun."""
    from ..checkpoints.layout import open_unified
    from ..runtime import generate as generate_onnx
    from .generate import generate
    from .onnx_export import export_onnx
    from .pull import pull
    from .verify import render_markdown, verify

    results = {}
    for n, family in enumerate(families, 1):
        if family not in DEMO_BUILDERS:
            raise StatecastError(f"unknown family {family!r}; choose from {', '.join(DEMO_BUILDERS)}")
        name, what, build = DEMO_BUILDERS[family]
        src = store.home() / "demo-source" / name
        shutil.rmtree(src, ignore_errors=True)
        build(src)
        info = pull(str(src), out=store.path_for(name), force=True, progress=False)
        cfg = open_unified(info["path"]).config
        say(f"== {n}/{len(families)} {family}: {what}")
        say(f"1. built a seeded {what.split(' (')[0]} ({cfg['n_layer']} layers x {cfg['d_model']}, vocab "
            f"{cfg['vocab_size']}) with transformers, saved in Hub format: {src}")
        say(f"2. convert pull {src} -> {info['path']} ({info['n_params']:,} parameters, {info['dtype']})")
        report = verify(info["path"], device="cpu", raise_on_fail=False)
        say(f"3. convert verify {name} -> {'PASS' if report['passed'] else 'FAIL'} against "
            f"{report['reference']['implementation']} {report['reference']['version']}")
        gen = generate(info["path"], prompt="The quick brown fox", max_new_tokens=24)
        say(f"4. convert generate {name} --prompt 'The quick brown fox' -> {gen['text']!r}")
        onnx = export_onnx(info["path"], force=True)
        p = onnx["parity"]
        say(f"5. convert export {name} --format onnx -> {onnx['path']} ({onnx['bytes'] / 1024:.0f} kB, T="
            f"{onnx['sequence_length']}); onnxruntime vs PyTorch: max_abs_diff {p['max_abs_diff']:.2g}, "
            f"top-1 {p['top1_agreement']:.3f}")
        ort = generate_onnx(onnx["path"], prompt="The quick brown fox", max_new_tokens=24)
        same = "same ids as PyTorch" if ort["new_ids"] == gen["new_ids"] else "ids DIFFER from PyTorch"
        say(f"6. convert generate {name}/onnx --runtime onnx --prompt 'The quick brown fox' -> {same}")
        say("")
        say(render_markdown(report))
        results[family] = {"path": info["path"], "parity": report, "generate": gen, "onnx": onnx,
                           "onnx_generate": ort}
    return results
