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
    dtype: torch.dtype  # what it computes in
    weights: str  # how the original files reached the reference, for the report
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


class HfReference(Reference):
    """transformers' class for the source architecture (``HfArch.architecture``), loaded with
    ``from_pretrained`` from the original directory, in the dtype our model computes in
    (float32 unless verify is asked for a lower precision).

    Per-layer hidden states are read with forward hooks on the decoder blocks (the
    residual stream after each block), because the ``output_hidden_states`` conventions
    differ between classes (some put the final norm's output in the last slot).
    """

    def __init__(self, path: Path, device: torch.device, arch, ucfg: dict, dtype: torch.dtype = torch.float32):
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        cls = getattr(transformers, arch.architecture)
        self.implementation = f"transformers.{arch.architecture}"
        self.version = metadata.version("transformers")
        self.device, self.dtype = device, dtype
        self.weights = (f"from_pretrained({str(path)!r}, dtype={str(dtype).removeprefix('torch.')}"
                        f"{''.join(f', {k}={v!r}' for k, v in arch.reference_kwargs)})")
        self.model = self._load(cls, path, arch, ucfg).to(device).eval()
        self.blocks = _decoder_blocks(self.model, ucfg["n_layer"])

    def _load(self, cls, path: Path, arch, ucfg: dict):
        return cls.from_pretrained(path, dtype=self.dtype, **dict(arch.reference_kwargs))

    @torch.inference_mode()
    def logits(self, ids):
        return self.model(ids.to(self.device), use_cache=False).logits.float().cpu()

    @torch.inference_mode()
    def hidden(self, ids):
        out: list[torch.Tensor] = []

        def grab(module, args, output):
            out.append((output[0] if isinstance(output, tuple) else output).float().cpu())

        hooks = [b.register_forward_hook(grab) for b in self.blocks]
        try:
            self.model(ids.to(self.device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return out

    @torch.inference_mode()
    def greedy(self, prompt, n):
        """transformers' own greedy ``generate`` with its cache, EOS disabled so exactly ``n`` tokens come out.

        (An ``eos_token_id=None`` in the GenerationConfig passed in counts as unset and
        the model's own EOS still stops generation; clearing it on the model does not.)
        """
        from transformers import GenerationConfig

        saved = self.model.generation_config.eos_token_id, self.model.config.eos_token_id
        self.model.generation_config.eos_token_id = self.model.config.eos_token_id = None
        try:
            gc = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0, use_cache=True)
            ids = torch.tensor([prompt], device=self.device)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        finally:
            self.model.generation_config.eos_token_id, self.model.config.eos_token_id = saved
        return out[0, len(prompt):].tolist()


def _decoder_blocks(model: torch.nn.Module, n_layer: int) -> torch.nn.ModuleList:
    """The model's stack of decoder blocks: its first ModuleList with one entry per layer."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layer:
            return module
    raise StatecastError(f"cannot find the {n_layer} decoder blocks of {type(model).__name__}")


class NativeMambaReference(HfReference):
    """transformers' ``MambaForCausalLM`` holding the state-spaces tensors unchanged.

    ``mamba_ssm`` (the native implementation) does not import without CUDA, so the
    reference is transformers' class, which computes the same function. The native
    names equal transformers' except the embedding (:data:`NATIVE_MAMBA_RENAMES`); the
    tensors are loaded by name with ``strict=True`` and no numeric change (a tied head is
    the embedding tensor itself).
    """

    def _load(self, cls, path: Path, arch, ucfg: dict):
        from transformers import AutoConfig

        from ..checkpoints.readers import open_tensors, weight_files

        config = AutoConfig.for_model(**arch.hf_config(ucfg, None))  # the dimensions read at conversion
        with torch.device("meta"):
            model = cls(config)
        with open_tensors(weight_files(path)) as src:
            state = {NATIVE_MAMBA_RENAMES.get(k, k): src.get(k).to(self.dtype) for k in src.keys()}
        if config.tie_word_embeddings:  # the head IS the embedding, whatever copy the file holds
            state["lm_head.weight"] = state["backbone.embeddings.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()
        self.weights = (f"state-spaces tensors from {path} loaded into {arch.architecture} by name; renamed "
                        + ", ".join(f"{a} -> {b}" for a, b in NATIVE_MAMBA_RENAMES.items())
                        + f"; {str(self.dtype).removeprefix('torch.')}")
        return model


NATIVE_MAMBA_RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


class RwkvPackageReference(Reference):
    """BlinkDL's ``rwkv`` package (``rwkv.model.RWKV``), strategy ``<device> fp32``, one sequence at a time.

    The package exposes no per-layer states, so per-layer comparison truncates its
    layer loop and reads the residual stream through its own final LayerNorm with
    unit weight and zero bias (``hidden_view = "layer_norm"``).
    """

    hidden_view = "layer_norm"
    dtype = torch.float32  # the package's CPU strategies compute in float32 (or int8 weights)

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
        self.weights = f"RWKV(model={str(path)!r}, strategy='{device.type} fp32')"

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


def make_reference(fmt_name: str, path: Path, device: torch.device, ucfg: dict,
                   dtype: torch.dtype = torch.float32) -> Reference:
    """The reference implementation for a recorded source format (``ucfg``: the unified config),
    computing in ``dtype`` where it can (``Reference.dtype`` says what it uses)."""
    from .families import format_by_name

    fam, arch, fmt = format_by_name(fmt_name)
    if arch is not None:
        return HfReference(path, device, arch, ucfg, dtype)
    if fmt.name == "rwkv-native":
        return RwkvPackageReference(path, device)
    if fmt.name == "mamba-native":
        return NativeMambaReference(path, device, fam.arch(fam.native.export_as), ucfg, dtype)
    raise StatecastError(f"no reference implementation for source format {fmt_name!r}")


def present_hidden(h: torch.Tensor, view: str) -> torch.Tensor:
    return F.layer_norm(h.float(), (h.shape[-1],)) if view == "layer_norm" else h.float()
