"""``convert generate``: prefill with the whole-sequence path, then one step per token."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..runtime.text import TextStream, decode, prompt_ids_of
from .loading import load_model, load_tokenizer


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, **sampling) -> list[int]:
    """Prefill ``prompt_ids`` with the whole-sequence path, then one step per new token; the new
    ids. ``sampling``: the keywords of :func:`statecast.runtime.text.decode` (greedy by default;
    ``temperature``, ``top_p``, ``seed``, ``stop_ids``, ``on_token``), the loop and sampler the
    ONNX runtime uses too, so a seed gives the same tokens in both. A model with a learned
    position table refuses, before generating, a prompt plus ``max_new_tokens`` that does not fit."""
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "positions", None) == "learned":
        sampling.setdefault("max_positions", cfg.max_positions)
    device = next(model.parameters()).device
    state = None

    def feed(ids: list[int]):
        nonlocal state
        logits, state = model(torch.tensor([ids], device=device), state)
        return logits[0, -1].float().cpu().numpy()  # [V]

    return decode(feed, lambda tok: feed([tok]), prompt_ids, max_new_tokens, **sampling)


def generate(path: str | Path, prompt: str | None = None, prompt_ids: str | None = None, max_new_tokens: int = 32,
             greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             dtype: str | None = None, device: str = "cpu", kernels: str = "auto",
             on_text: Callable[[str], None] | None = None) -> dict:
    model, um = load_model(path, dtype=dtype, device=device, kernels=kernels)
    tok = load_tokenizer(um)
    ids = prompt_ids_of(tok, prompt, prompt_ids, um.config["vocab_size"], um.path)
    stream = TextStream(tok, on_text)
    generate_ids(model, ids, max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p, seed=seed,
                 on_token=stream, where=str(um.path))
    return {"prompt_ids": ids, "new_ids": stream.ids, "text": stream.text()}
