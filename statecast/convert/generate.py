"""``convert generate``: prefill with the whole-sequence path, then one step per token."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import StatecastError
from ..runtime.text import TextStream, prompt_ids_of
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


def generate(path: str | Path, prompt: str | None = None, prompt_ids: str | None = None, max_new_tokens: int = 32,
             greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             dtype: str | None = None, device: str = "cpu", kernels: str = "torch",
             on_text: Callable[[str], None] | None = None) -> dict:
    model, um = load_model(path, dtype=dtype, device=device, kernels=kernels)
    tok = load_tokenizer(um)
    ids = prompt_ids_of(tok, prompt, prompt_ids, um.config["vocab_size"], um.path)
    stream = TextStream(tok, on_text)
    generate_ids(model, ids, max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p, seed=seed,
                 on_token=stream)
    return {"prompt_ids": ids, "new_ids": stream.ids, "text": stream.text()}
