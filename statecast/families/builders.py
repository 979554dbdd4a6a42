"""Shared pieces of the demo builders: a tiny tokenizer, trained-like weight magnitudes, saving.

Each family's record has a builder (``Family.demo.build``) that makes a seeded checkpoint with
the original library's own classes and ``save_pretrained``, exactly what a Hub repo holds;
``convert demo`` and the tests use the same builders.
"""

from __future__ import annotations

from pathlib import Path

import torch

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


def seeded_checkpoint(out: Path, make_model, *, seed: int, vocab: int, fmt: str = "safetensors", shard: str | None = None,
                      dtype: torch.dtype | None = None, spread: bool = True, keep: tuple[str, ...] = ()) -> Path:
    """A demo checkpoint in Hub format: the tokenizer trained to ``vocab`` ids,
    ``make_model(vocab_size)`` built under ``torch.manual_seed(seed)`` (the library's own class
    and init), its weights spread to trained-like magnitudes (:func:`spread_weights`, leaving
    ``keep`` alone) unless ``spread`` is False, saved by :func:`save_checkpoint`."""
    torch.manual_seed(seed)
    tok = build_tokenizer(vocab)
    model = make_model(tok.get_vocab_size())
    if spread:
        spread_weights(model, seed, keep=keep)
    return save_checkpoint(model, tok, out, fmt, shard, dtype)


def save_checkpoint(model, tok, out: Path, fmt: str, shard: str | None, dtype: torch.dtype | None) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, safe_serialization=(fmt == "safetensors"), **kwargs)
    tok.save(str(out / "tokenizer.json"))
    return out


