"""Reference implementations that ``verify`` compares against, one per source format.

Each reference runs the ORIGINAL implementation on the ORIGINAL files:
transformers' model class for Hub-format sources, BlinkDL's ``rwkv`` package for
native RWKV-4 ``.pth`` files. A reference gives full-sequence logits, per-layer
hidden states and greedy continuations; ``hidden_view`` says how its hidden
states are presented so ours can be presented the same way.
"""

from __future__ import annotations

import abc
import contextlib
import io
import os
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import StatecastError


class Reference(abc.ABC):
    implementation: str
    version: str
    hidden_view = "raw"  # or "layer_norm": normalised without affine (when raw states are not exposed)

    @abc.abstractmethod
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, V] float32 logits on the CPU."""

    @abc.abstractmethod
    def hidden(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """[B, T] -> one [B, T, C] residual-stream tensor per layer (after the block)."""

    @abc.abstractmethod
    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """``n`` greedily decoded token ids after ``prompt``."""


class HfRwkvReference(Reference):
    """transformers' ``RwkvForCausalLM``, float32, ``rescale_every=0`` (no eval-mode weight rescaling)."""

    def __init__(self, path: Path, device: torch.device):
        from transformers import RwkvForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.implementation = "transformers.RwkvForCausalLM"
        self.version = metadata.version("transformers")
        self.device = device
        self.model = RwkvForCausalLM.from_pretrained(path, rescale_every=0, dtype=torch.float32).to(device).eval()

    @torch.inference_mode()
    def logits(self, ids):
        return self.model(ids.to(self.device)).logits.float().cpu()

    @torch.inference_mode()
    def hidden(self, ids):
        out = self.model(ids.to(self.device), output_hidden_states=True)
        return [h.float().cpu() for h in out.hidden_states[: self.model.config.num_hidden_layers]]

    @torch.inference_mode()
    def greedy(self, prompt, n):
        out = self.model(torch.tensor([prompt], device=self.device), use_cache=True)
        new = []
        for _ in range(n):
            tok = int(out.logits[0, -1].argmax())
            new.append(tok)
            out = self.model(torch.tensor([[tok]], device=self.device), state=out.state, use_cache=True)
        return new


class RwkvPackageReference(Reference):
    """BlinkDL's ``rwkv`` package (``rwkv.model.RWKV``), strategy ``<device> fp32``, one sequence at a time.

    The package exposes no per-layer states, so per-layer comparison truncates its
    layer loop and reads the residual stream through its own final LayerNorm with
    unit weight and zero bias (``hidden_view = "layer_norm"``).
    """

    hidden_view = "layer_norm"

    def __init__(self, path: Path, device: torch.device):
        try:
            self.version = metadata.version("rwkv")
        except metadata.PackageNotFoundError:
            raise StatecastError("verifying a native RWKV .pth needs BlinkDL's rwkv package: pip install 'statecast[rwkv]'") from None
        # The package reads these at import time; they select its pure-PyTorch path.
        os.environ.setdefault("RWKV_JIT_ON", "0")
        os.environ["RWKV_CUDA_ON"] = "0"
        with contextlib.redirect_stdout(io.StringIO()):
            from rwkv.model import RWKV

            self.model = RWKV(model=str(path), strategy=f"{device.type} fp32", verbose=False)
        self.implementation = "rwkv.model.RWKV"

    def _run(self, tokens: list[int], state=None):
        with contextlib.redirect_stdout(io.StringIO()):
            return self.model.forward(tokens, state, full_output=True)

    def logits(self, ids):
        return torch.stack([self._run(seq.tolist())[0].reshape(ids.shape[1], -1).float().cpu() for seq in ids])

    def hidden(self, ids):
        m, w = self.model, self.model.w
        n_layer, saved = m.args.n_layer, {k: w[k] for k in ("ln_out.weight", "ln_out.bias", "head.weight")}
        c = m.args.n_embd
        try:
            w["ln_out.weight"] = torch.ones_like(saved["ln_out.weight"])
            w["ln_out.bias"] = torch.zeros_like(saved["ln_out.bias"])
            w["head.weight"] = torch.eye(c, dtype=saved["head.weight"].dtype, device=saved["head.weight"].device)
            out = []
            for i in range(n_layer):
                m.args.n_layer = i + 1
                out.append(torch.stack([self._run(seq.tolist())[0].reshape(ids.shape[1], c).float().cpu() for seq in ids]))
            return out
        finally:
            m.args.n_layer = n_layer
            w.update(saved)

    def greedy(self, prompt, n):
        logits, state = self._run(prompt)
        new = []
        for _ in range(n):
            tok = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
            new.append(tok)
            logits, state = self._run([tok], state)
        return new


REFERENCES = {
    "rwkv-hf": HfRwkvReference,
    "rwkv-native": RwkvPackageReference,
}


def present_hidden(h: torch.Tensor, view: str) -> torch.Tensor:
    return F.layer_norm(h.float(), (h.shape[-1],)) if view == "layer_norm" else h.float()
