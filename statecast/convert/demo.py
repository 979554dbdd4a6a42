"""``convert demo``: the whole chain offline on a small seeded RWKV-4 built with transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..checkpoints import store

DEMO_NAME = "demo-rwkv4"
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


def build_hf_checkpoint(out: Path, seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 320,
                        fmt: str = "safetensors") -> Path:
    """A seeded ``RwkvForCausalLM`` saved in Hub format with a tokenizer (what a Hub repo holds)."""
    from transformers import RwkvConfig, RwkvForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    tok = build_tokenizer(vocab)
    cfg = RwkvConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                     intermediate_size=4 * hidden, context_length=256, bos_token_id=0, eos_token_id=0)
    model = RwkvForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=(fmt == "safetensors"))
    tok.save(str(out / "tokenizer.json"))
    return out


def run_demo(say: Callable[[str], None] = print) -> dict:
    """Build, pull, verify, generate; the source stays in the store so `convert verify` can be rerun."""
    import shutil

    from .generate import generate
    from .pull import pull
    from .verify import render_markdown, verify

    src = store.home() / "demo-source" / "rwkv4-tiny"
    shutil.rmtree(src, ignore_errors=True)
    build_hf_checkpoint(src)
    info = pull(str(src), out=store.path_for(DEMO_NAME), force=True, progress=False)
    from ..checkpoints.layout import open_unified

    cfg = open_unified(info["path"]).config
    say(f"1. built a seeded RWKV-4 ({cfg['n_layer']} layers x {cfg['d_model']}, vocab {cfg['vocab_size']}) "
        f"with transformers, saved in Hub format: {src}")
    say(f"2. convert pull {src} -> {info['path']} ({info['n_params']:,} parameters, {info['dtype']})")
    report = verify(info["path"], device="cpu", raise_on_fail=False)
    say(f"3. convert verify {DEMO_NAME} -> {'PASS' if report['passed'] else 'FAIL'} against "
        f"{report['reference']['implementation']} {report['reference']['version']}")
    gen = generate(info["path"], prompt="The quick brown fox", max_new_tokens=24)
    say(f"4. convert generate {DEMO_NAME} --prompt 'The quick brown fox' -> {gen['text']!r}")
    say("")
    say(render_markdown(report))
    return {"path": info["path"], "parity": report, "generate": gen}
