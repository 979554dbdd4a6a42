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


DEFAULT_KERNELS = "auto"


def kernel_choices() -> list[str]:
    """What ``--kernels`` accepts: "auto" and every family's kernels ("torch" first)."""
    known = {k for f in FAMILIES.values() for k in f.kernels}
    return ["auto", "torch", *sorted(known - {"torch"})]


def check_kernels(family: str, kernels: str) -> None:
    """``kernels`` is "auto" or one of the family's (``Family.kernels``), else a one-line error."""
    fam = FAMILIES[family]
    if kernels == "auto" or kernels in fam.kernels:
        return
    if kernels not in kernel_choices():
        raise StatecastError(f"unknown kernels {kernels!r}; choose {', '.join(kernel_choices())}")
    raise StatecastError(f"--kernels {kernels}: the {family} family has no {kernels} kernels")


def select_kernels(model, family: str, kernels: str, **where) -> str:
    """Set ``model``'s whole-sequence path and return which one runs, as a report records it:
    "torch" (a family with no compiled kernels, or asked for), "compiled", or for "auto"
    where the compiled kernels cannot run here "torch (compiled kernel unavailable: <why>)".
    ``where``: ``device`` / ``dtype`` the model will run in, for a model whose weights are
    not loaded yet. An explicit compiled choice that cannot run here is a one-line error."""
    check_kernels(family, kernels)
    fam = FAMILIES[family]
    if kernels == fam.kernels[0] or (kernels == "auto" and len(fam.kernels) == 1):
        return fam.kernels[0]  # a new model runs the pure path
    try:
        used = model.set_kernels(kernels, **where)
    except RuntimeError as e:
        raise StatecastError(str(e).splitlines()[0]) from None
    return used if isinstance(used, str) else kernels


def load_model(path: str | Path | UnifiedModel, dtype: str | None = None, device: str = "cpu",
               kernels: str = DEFAULT_KERNELS):
    """(model in eval mode, UnifiedModel). ``dtype`` casts floating weights except float32-kept ones.

    ``kernels``: "auto" (default) runs the family's compiled whole-sequence path (Mamba's C++
    CPU scan) where it has one that can run here (it builds and passes its self-check; a
    float32 model on the CPU), else the pure-PyTorch path; "torch" the pure path; a kernel
    name (``Family.kernels``) that one, an error where the family has none or it cannot run
    here. Which one runs is ``model.kernels`` (see :func:`select_kernels`).
    """
    um = path if isinstance(path, UnifiedModel) else open_unified(path)
    check_model(um)  # the manifest's shapes are what the recorded config builds
    fam = FAMILIES[um.family]
    dev = resolve_device(device)
    check_kernels(um.family, kernels)
    model = fam.build(um.config, "meta")
    state = um.state_dict()
    if dtype is not None:
        target = parse_dtype(dtype)
        state = {k: v.to(fam.storage_dtype(k, v.dtype, target)) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(dev).eval()
    model.kernels = select_kernels(model, um.family, kernels)
    return model, um


def load_tokenizer(um: UnifiedModel):
    """A ``tokenizers.Tokenizer`` when the model has ``tokenizer.json``, else None."""
    return tokenizer_in(um.path)
