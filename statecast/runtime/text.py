"""Prompt parsing, the sampler, the decode loop and text streaming: one of each for both
runtimes (PyTorch and ONNX), so the same ``--seed`` gives the same tokens in either. numpy
only (no torch): the PyTorch runtime hands its logits over as numpy arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import StatecastError


def tokenizer_in(directory: Path):
    """A ``tokenizers.Tokenizer`` from ``directory/tokenizer.json`` (a model's or an export's), or None."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def parse_ids(text: str, vocab_size: int) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``, every id inside the vocabulary."""
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise StatecastError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise StatecastError(f"--prompt-ids out of range for a vocabulary of {vocab_size}: {bad[:5]}")
    return ids


def prompt_ids_of(tokenizer, prompt: str | None, prompt_ids: str | None, vocab_size: int, where) -> list[int]:
    """The prompt as token ids: ``prompt`` encoded with ``tokenizer``, or ``prompt_ids`` parsed
    (exactly one of them). ``where`` names the model in the error when it has no tokenizer."""
    if (prompt is None) == (prompt_ids is None):
        raise StatecastError("give exactly one of --prompt or --prompt-ids")
    if prompt is not None:
        if tokenizer is None:
            raise StatecastError(f"{where} has no tokenizer.json; use --prompt-ids 1,2,3")
        return tokenizer.encode(prompt).ids
    return parse_ids(prompt_ids, vocab_size)


def sample_next(logits: np.ndarray, greedy: bool, temperature: float, top_p: float, rng: np.random.Generator | None) -> int:
    """One token id from ``logits [V]``: argmax (the first maximum, as ``torch.argmax``), or
    nucleus sampling at ``temperature`` (the smallest prefix of the sorted distribution whose
    mass reaches ``top_p``)."""
    if greedy or temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    sorted_p = p[order]
    sorted_p = sorted_p * (np.cumsum(sorted_p) - sorted_p < top_p)
    rng = rng if rng is not None else np.random.default_rng()
    return int(order[rng.choice(len(sorted_p), p=sorted_p / sorted_p.sum())])


def decode(start: Callable[[list[int]], np.ndarray], step: Callable[[int], np.ndarray], prompt_ids: list[int],
           max_new_tokens: int, *, greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
           seed: int | None = None, stop_ids: tuple[int, ...] = (), on_token: Callable[[int], None] | None = None) -> list[int]:
    """The decode loop of both runtimes: ``start(prompt_ids)`` ingests the prompt and returns the
    last position's logits [V]; ``step(token)`` feeds one token and returns the next logits [V]
    (each runtime keeps its state in the closures). Samples with :func:`sample_next` from a
    numpy generator seeded with ``seed``; stops after ``max_new_tokens`` or a token in ``stop_ids``.
    Returns the new ids."""
    if not prompt_ids:
        raise StatecastError("the prompt is empty")
    rng = np.random.default_rng(seed)
    logits = start(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        tok = sample_next(logits, greedy, temperature, top_p, rng)
        new.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in stop_ids or len(new) == max_new_tokens:
            break
        logits = step(tok)
    return new


class TextStream:
    """Collects generated ids (call it with each new id) and hands ``on_text`` the text decoded
    so far, whole characters only (a partial UTF-8 sequence waits for its next token)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None = None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        if self.tokenizer is not None and self.on_text is not None:
            text = self.tokenizer.decode(self.ids)
            if text.startswith(self.shown) and not text.endswith("\ufffd"):
                self.on_text(text[len(self.shown):])
                self.shown = text

    def text(self) -> str:
        return self.tokenizer.decode(self.ids) if self.tokenizer is not None else " ".join(map(str, self.ids))
