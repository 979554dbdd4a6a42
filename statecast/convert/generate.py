"""``convert generate``: prefill with the whole-sequence path, then one step per token."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import StatecastError
from .loading import load_model, load_tokenizer


def sample_next(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """One token id from ``logits [V]``: argmax, or nucleus sampling at ``temperature``."""
    if greedy or temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[choice])


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, *, greedy: bool = True, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, stop_ids: tuple[int, ...] = (),
                 on_token: Callable[[int], None] | None = None) -> list[int]:
    if not prompt_ids:
        raise StatecastError("the prompt is empty")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    logits, state = model(torch.tensor([prompt_ids], device=device))
    new: list[int] = []
    for _ in range(max_new_tokens):
        tok = sample_next(logits[0, -1].float().cpu(), greedy, temperature, top_p, gen)
        new.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in stop_ids or len(new) == max_new_tokens:
            break
        logits, state = model(torch.tensor([[tok]], device=device), state)
    return new


def parse_ids(text: str, vocab_size: int) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise StatecastError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise StatecastError(f"--prompt-ids out of range for a vocabulary of {vocab_size}: {bad[:5]}")
    return ids


def generate(path: str | Path, prompt: str | None = None, prompt_ids: str | None = None, max_new_tokens: int = 32,
             greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             dtype: str | None = None, device: str = "cpu", kernels: str = "torch",
             on_text: Callable[[str], None] | None = None) -> dict:
    model, um = load_model(path, dtype=dtype, device=device, kernels=kernels)
    tok = load_tokenizer(um)
    if (prompt is None) == (prompt_ids is None):
        raise StatecastError("give exactly one of --prompt or --prompt-ids")
    if prompt is not None:
        if tok is None:
            raise StatecastError(f"{um.path} has no tokenizer.json; use --prompt-ids 1,2,3")
        ids = tok.encode(prompt).ids
    else:
        ids = parse_ids(prompt_ids, um.config["vocab_size"])

    new_ids: list[int] = []
    shown = ""

    def on_token(token: int) -> None:
        """Collect the token; stream the text decoded so far (whole characters only)."""
        nonlocal shown
        new_ids.append(token)
        if tok is not None and on_text is not None:
            text = tok.decode(new_ids)
            if text.startswith(shown) and not text.endswith("\ufffd"):
                on_text(text[len(shown):])
                shown = text

    generate_ids(model, ids, max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p, seed=seed,
                 on_token=on_token)
    text = tok.decode(new_ids) if tok is not None else " ".join(map(str, new_ids))
    return {"prompt_ids": ids, "new_ids": new_ids, "text": text}
