"""Prompt parsing, the sampler, the decode loop and text streaming: one of each for both
runtimes (PyTorch and ONNX), so the same ``--seed`` gives the same tokens in either. numpy
only (no torch): the PyTorch runtime hands its logits over as numpy arrays."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import StatecastError

MAX_SEED = 2**63 - 1  # seeds are 0 <= S <= MAX_SEED, for both runtimes (numpy refuses negative ones)


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


def check_prompt(prompt: str | None) -> None:
    """A prompt must be text that UTF-8 can encode: on Linux an argument that is not valid UTF-8
    arrives as a str with lone surrogates (``"\\udcff"`` for the byte 0xff), which no tokenizer takes."""
    if prompt is None:
        return
    if not isinstance(prompt, str):
        raise StatecastError(f"--prompt must be text, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = prompt[e.start]
        what = f"byte 0x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"character U+{ord(ch):04X}"
        raise StatecastError(f"--prompt is not valid UTF-8 text ({what} at position {e.start}); "
                             "pass UTF-8 text or token ids with --prompt-ids") from None


def check_sampling(temperature: float, top_p: float, seed: int | None) -> None:
    """The sampling arguments both runtimes accept: a finite ``temperature`` >= 0 (0 is greedy),
    ``0 < top_p <= 1``, and a ``seed`` that is None or an integer in [0, 2**63)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise StatecastError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not (0 < top_p <= 1):  # nan fails too
        raise StatecastError(f"--top-p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED):
        raise StatecastError(f"--seed must be an integer with 0 <= seed < 2**63, got {seed!r}")


def check_positions(n_prompt: int, max_new_tokens: int, max_positions: int | None, where) -> None:
    """Refuse, before anything is generated, a prompt plus ``max_new_tokens`` that would run past
    a learned position table of ``max_positions`` entries (None: no such limit). The last new
    token is not fed back, so ``n_prompt + max_new_tokens - 1`` positions are used."""
    if max_positions is None:
        return
    if n_prompt > max_positions:
        raise StatecastError(f"the prompt has {n_prompt} tokens but {where} has a learned position table of "
                             f"{max_positions} (max_positions): shorten the prompt")
    if n_prompt + max_new_tokens - 1 > max_positions:
        raise StatecastError(f"the prompt ({n_prompt} tokens) plus --max-new-tokens {max_new_tokens} needs "
                             f"{n_prompt + max_new_tokens - 1} positions but {where} has a learned position table of "
                             f"{max_positions} (max_positions): use --max-new-tokens {max_positions - n_prompt + 1} or less")


def prompt_ids_of(tokenizer, prompt: str | None, prompt_ids: str | None, vocab_size: int, where) -> list[int]:
    """The prompt as token ids: ``prompt`` encoded with ``tokenizer``, or ``prompt_ids`` parsed
    (exactly one of them). ``where`` names the model in the error when it has no tokenizer."""
    if (prompt is None) == (prompt_ids is None):
        raise StatecastError("give exactly one of --prompt or --prompt-ids")
    check_prompt(prompt)
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
           seed: int | None = None, stop_ids: tuple[int, ...] = (), on_token: Callable[[int], None] | None = None,
           max_positions: int | None = None, where: str = "the model") -> list[int]:
    """The decode loop of both runtimes: ``start(prompt_ids)`` ingests the prompt and returns the
    last position's logits [V]; ``step(token)`` feeds one token and returns the next logits [V]
    (each runtime keeps its state in the closures). Samples with :func:`sample_next` from a
    numpy generator seeded with ``seed``; stops after ``max_new_tokens`` or a token in ``stop_ids``.
    The arguments are checked before anything runs (:func:`check_sampling`, and
    :func:`check_positions` against ``max_positions``, a learned position table's size, naming
    ``where``). Returns the new ids."""
    if not prompt_ids:
        raise StatecastError("the prompt is empty")
    check_sampling(temperature, top_p, seed)
    check_positions(len(prompt_ids), max_new_tokens, max_positions, where)
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
