"""The reference implementations that ``verify`` compares against: the interface, and the one
for every Hub architecture (transformers' class).

Each reference runs the ORIGINAL implementation on the ORIGINAL files: transformers' model
class for Hub-format sources (:class:`HfReference`); a native format's record names its own
(BlinkDL's ``rwkv`` package for RWKV-4 ``.pth`` files, in ``families/rwkv.py``). A reference gives full-sequence logits, per-layer
hidden states and greedy continuations; ``hidden_view`` says how its hidden
states are presented so ours can be presented the same way.
"""

from __future__ import annotations

import abc
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


class RenamedHfReference(HfReference):
    """transformers' class holding a native checkpoint's tensors, loaded by name.

    For a native format whose own implementation cannot run here (``mamba_ssm`` does not
    import without CUDA) but whose tensors are transformers' under a few other names: the
    model is built from the unified config (the dimensions read at conversion) on the meta
    device, every tensor is loaded unchanged after ``renames`` (native name -> transformers
    name) with ``strict=True``, and a tied head is the embedding tensor itself. ``origin``
    names the format in the report's ``weights`` line.
    """

    def __init__(self, path: Path, device: torch.device, arch, ucfg: dict, dtype: torch.dtype,
                 renames: dict[str, str], origin: str):
        self.renames, self.origin = renames, origin
        super().__init__(path, device, arch, ucfg, dtype)

    def _load(self, cls, path: Path, arch, ucfg: dict):
        from transformers import AutoConfig, PreTrainedConfig

        from ..checkpoints.readers import open_tensors, weight_files

        # config.json's content, decoded as from_pretrained decodes it ({"__float__": "Infinity"} -> inf)
        config = AutoConfig.for_model(**PreTrainedConfig._decode_special_floats(arch.hf_config(ucfg, None)))
        with torch.device("meta"):
            model = cls(config)
        with open_tensors(weight_files(path)) as src:
            state = {self.renames.get(k, k): src.get(k).to(self.dtype) for k in src.keys()}
        if config.tie_word_embeddings:  # the head IS the embedding, whatever copy the file holds
            emb = model.get_input_embeddings().weight
            emb_key = next(k for k, p in model.named_parameters(remove_duplicate=False) if p is emb)
            state["lm_head.weight"] = state[emb_key]
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()
        self.weights = (f"{self.origin} tensors from {path} loaded into {arch.architecture} by name; renamed "
                        + ", ".join(f"{a} -> {b}" for a, b in self.renames.items())
                        + f"; {str(self.dtype).removeprefix('torch.')}")
        return model


def _decoder_blocks(model: torch.nn.Module, n_layer: int) -> torch.nn.ModuleList:
    """The model's stack of decoder blocks: its first ModuleList with one entry per layer."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layer:
            return module
    raise StatecastError(f"cannot find the {n_layer} decoder blocks of {type(model).__name__}")


def present_hidden(h: torch.Tensor, view: str) -> torch.Tensor:
    return F.layer_norm(h.float(), (h.shape[-1],)) if view == "layer_norm" else h.float()
