"""Drive an exported graph with onnxruntime, one call per token (or per prompt chunk).

An export directory (``convert export PATH --format onnx``) holds ``model.onnx`` and a
``statecast.json`` of format ``statecast-onnx/1`` that names every graph input and output
and gives each state tensor's dtype, shape and initial value. That description is all this
module reads: it imports onnxruntime, numpy and tokenizers, never torch (also not
transitively), so it runs where torch is not installed.

Shapes below: B batch, T new tokens in a call, V vocab; state tensors are per layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import StatecastError
from .text import TextStream, decode, prompt_ids_of, tokenizer_in

FORMAT = "statecast-onnx/1"
DESCRIPTION = "statecast.json"
# symbolic dimension names (onnxruntime-genai's)
BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


# --------------------------------------------------------------------------- finding an export


def _format_of(directory: Path) -> str | None:
    try:
        return json.loads((directory / DESCRIPTION).read_text()).get("format")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def find_export(path: str | Path) -> Path:
    """The export directory for PATH: PATH itself, or PATH/onnx when PATH is a converted model
    (a directory or a store name)."""
    p = Path(path)
    if not p.exists():
        from ..checkpoints.store import resolve  # torch-free

        p = resolve(path)
    for candidate in (p, p / "onnx"):
        if _format_of(candidate) == FORMAT:
            return candidate
    if not p.exists():
        raise StatecastError(f"no such model: {path}")
    raise StatecastError(f"{path} is not an ONNX export (no {DESCRIPTION} of format {FORMAT}); "
                         "make one with `convert export PATH --format onnx`")


def load_description(directory: str | Path) -> dict:
    """The parsed ``statecast.json`` of an export directory."""
    directory = Path(directory)
    if _format_of(directory) != FORMAT:
        raise StatecastError(f"{directory} is not an ONNX export (no {DESCRIPTION} of format {FORMAT})")
    desc = json.loads((directory / DESCRIPTION).read_text())
    if not (directory / desc["graph"]).is_file():
        raise StatecastError(f"{directory}: graph file {desc['graph']} is missing")
    return desc


# --------------------------------------------------------------------------- session


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise StatecastError("onnxruntime is not installed: pip install onnxruntime (onnxruntime-gpu for --provider cuda)") from None
    return onnxruntime


def provider_name(provider: str) -> str:
    """onnxruntime's name of ``provider`` ("cpu" or "cuda"); a one-line error when it is unknown
    or this onnxruntime lacks it (``cuda`` needs onnxruntime-gpu)."""
    ort = _onnxruntime()
    if provider not in PROVIDERS:
        raise StatecastError(f"unknown provider {provider!r}; choose {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        raise StatecastError(f"--provider {provider} needs {name} (install onnxruntime-gpu with a CUDA machine); "
                             f"this onnxruntime {ort.__version__} has {', '.join(available)}")
    return name


def make_session(graph: Path, provider: str = "cpu", threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on ``provider`` ("cpu" or "cuda"); ``threads``:
    intra-op threads (None: onnxruntime's default, one per physical core)."""
    ort = _onnxruntime()
    name = provider_name(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no per-node placement warnings
    if threads is not None:
        options.intra_op_num_threads = threads
    fallback = [] if name == PROVIDERS["cpu"] else [PROVIDERS["cpu"]]  # ops a GPU provider lacks run on the CPU
    session = ort.InferenceSession(str(graph), sess_options=options, providers=[name, *fallback])
    if session.get_providers()[0] != name:  # onnxruntime falls back to the CPU when CUDA fails to start
        raise StatecastError(f"--provider {provider}: onnxruntime could not start {name}")
    return session


def _concrete(shape: list, batch: int) -> tuple[int, ...]:
    """A described initial-state shape with the batch filled in (every other dim is a number)."""
    return tuple(batch if d == BATCH else d for d in shape)


# --------------------------------------------------------------------------- the model


class OnnxModel:
    """An exported model in onnxruntime: ``model(input_ids, state) -> (logits, state)`` as the
    PyTorch models, with numpy arrays; the state is a dict of the graph's state inputs
    (``past_key_values.{i}.*``) to arrays, returned anew by every call.

    ``OnnxModel(path, provider="cpu", threads=None)``: PATH is an export directory, or a converted
    model (directory or store name) whose ``onnx/`` is used; ``threads`` as :func:`make_session`.
    """

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None):
        self.path = find_export(path)
        self.desc = load_description(self.path)
        self.provider = provider
        self.session = make_session(self.path / self.desc["graph"], provider, threads)
        self.state_specs: list[dict] = self.desc["state"]
        self._outputs = ["logits"] + [s["output"] for s in self.state_specs]
        growing = [s for s in self.state_specs if s.get("length_axis") is not None]
        self._length_spec = growing[0] if growing else None  # a KV tensor: its length is the past

    @property
    def family(self) -> str:
        return self.desc["family"]

    @property
    def vocab_size(self) -> int:
        return self.desc["vocab_size"]

    @property
    def sequence_length(self) -> str | int:
        """``"dynamic"`` (any T per call) or the one T the graph takes (1)."""
        return self.desc["sequence_length"]

    def init_state(self, batch: int) -> dict[str, np.ndarray]:
        """The empty history for ``batch`` sequences (KV length 0, RWKV's running max -1e38, ...)."""
        return {
            s["input"]: np.full(_concrete(s["initial"]["shape"], batch), s["initial"]["fill"], dtype=NUMPY_DTYPES[s["dtype"]])
            for s in self.state_specs
        }

    def past_length(self, state: dict[str, np.ndarray]) -> int | None:
        """Positions already in a growing (KV) state; None for a purely recurrent state."""
        if self._length_spec is None:
            return None
        return int(state[self._length_spec["input"]].shape[self._length_spec["length_axis"]])

    def run(self, input_ids: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One graph call: input_ids [B, T] int64 (T as the graph allows) -> logits [B, T, V], new state."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        T = ids.shape[1]
        if self.sequence_length != "dynamic" and T != self.sequence_length:
            raise StatecastError(f"this graph takes {self.sequence_length} token(s) per call, got {T}")
        limit = self.desc.get("max_positions")
        past = self.past_length(state)
        if limit is not None and past is not None and past + T > limit:
            raise StatecastError(f"positions {past}..{past + T - 1} exceed the learned position table "
                                 f"(max_positions={limit}): the model has no embedding for positions >= {limit}")
        outs = self.session.run(self._outputs, {"input_ids": ids, **state})
        return outs[0], {s["input"]: o for s, o in zip(self.state_specs, outs[1:])}

    def __call__(self, input_ids, state: dict[str, np.ndarray] | None = None):
        """input_ids [B, T], any T -> logits [B, T, V], new state. A graph that takes one token
        per call is fed the T tokens in turn; ``state`` None is the empty history."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise StatecastError(f"input_ids must be [batch, tokens] with at least one token, got shape {ids.shape}")
        if state is None:
            state = self.init_state(ids.shape[0])
        if self.sequence_length == "dynamic":
            return self.run(ids, state)
        logits = []
        for t in range(ids.shape[1]):
            step_logits, state = self.run(ids[:, t : t + 1], state)
            logits.append(step_logits)
        return (logits[0] if len(logits) == 1 else np.concatenate(logits, axis=1)), state

    def prefill(self, input_ids, state: dict[str, np.ndarray] | None = None):
        """Like ``__call__`` but returns only the last position's logits [B, V] (a token-by-token
        prefill keeps no [B, T, V] history)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if self.sequence_length == "dynamic" or ids.shape[1] == 1:
            logits, state = self(ids, state)
            return logits[:, -1], state
        if state is None:
            state = self.init_state(ids.shape[0])
        for t in range(ids.shape[1]):
            logits, state = self.run(ids[:, t : t + 1], state)
        return logits[:, -1], state

    def generate(self, prompt_ids: list[int], max_new_tokens: int, **sampling) -> list[int]:
        """Prefill ``prompt_ids``, then one call per new token; the new ids. ``sampling``: the
        keywords of :func:`statecast.runtime.text.decode` (greedy by default; ``temperature``,
        ``top_p``, ``seed``, ``stop_ids``, ``on_token``), the loop the PyTorch runtime uses too. A
        graph with a learned position table refuses, before generating, what would not fit in it."""
        sampling.setdefault("max_positions", self.desc.get("max_positions"))
        sampling.setdefault("where", str(self.path))
        state = None

        def feed(ids: list[int]) -> np.ndarray:
            nonlocal state
            logits, state = self.prefill(np.asarray([ids], dtype=np.int64), state)
            return logits[0]

        return decode(feed, lambda tok: feed([tok]), prompt_ids, max_new_tokens, **sampling)

def generate(path: str | Path, prompt: str | None = None, prompt_ids: str | None = None, max_new_tokens: int = 32,
             greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             provider: str = "cpu", on_text: Callable[[str], None] | None = None) -> dict:
    """``convert generate PATH --runtime onnx``: as the torch ``generate``, through onnxruntime.
    Returns ``{"prompt_ids", "new_ids", "text"}``."""
    model = OnnxModel(path, provider=provider)
    tok = tokenizer_in(model.path)
    ids = prompt_ids_of(tok, prompt, prompt_ids, model.vocab_size, model.path)
    stream = TextStream(tok, on_text)
    model.generate(ids, max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p, seed=seed, on_token=stream)
    return {"prompt_ids": ids, "new_ids": stream.ids, "text": stream.text()}
