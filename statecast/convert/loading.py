"""Build a PyTorch model from a unified-layout directory."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoints.layout import UnifiedModel, open_unified
from ..checkpoints.readers import parse_dtype
from ..errors import StatecastError
from ..families import FAMILIES
from ..runtime.text import tokenizer_in
from .describe import check_model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise StatecastError("--device cuda requested but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise StatecastError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return torch.device(device)


def load_model(path: str | Path | UnifiedModel, dtype: str | None = None, device: str = "cpu", kernels: str = "torch"):
    """(model in eval mode, UnifiedModel). ``dtype`` casts floating weights except float32-kept ones.

    ``kernels`` other than "torch" selects one of the family's compiled whole-sequence paths
    (``Family.kernels``; Mamba's C++ CPU scan): an error where the family has none or it
    cannot be built here.
    """
    um = path if isinstance(path, UnifiedModel) else open_unified(path)
    check_model(um)  # the manifest's shapes are what the recorded config builds
    fam = FAMILIES[um.family]
    dev = resolve_device(device)
    if kernels not in fam.kernels:
        known = sorted({k for f in FAMILIES.values() for k in f.kernels})
        if kernels not in known:
            raise StatecastError(f"unknown kernels {kernels!r}; choose {', '.join(known)}")
        raise StatecastError(f"--kernels {kernels}: the {um.family} family has no {kernels} kernels")
    model = fam.build(um.config, "meta")
    state = um.state_dict()
    if dtype is not None:
        target = parse_dtype(dtype)
        state = {k: v.to(fam.storage_dtype(k, v.dtype, target)) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(dev).eval()
    if kernels != fam.kernels[0]:
        try:
            model.set_kernels(kernels)
        except RuntimeError as e:
            raise StatecastError(str(e).splitlines()[0]) from None
    return model, um


def load_tokenizer(um: UnifiedModel):
    """A ``tokenizers.Tokenizer`` when the model has ``tokenizer.json``, else None."""
    return tokenizer_in(um.path)
