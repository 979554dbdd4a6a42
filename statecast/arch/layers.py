"""Shared building blocks for the statecast architectures (pure PyTorch, no I/O).

Dimension letters used in the shape comments (each model file repeats the ones it uses):

    B  batch
    T  time (sequence length)
    C  d_model (residual stream width)
    X  any trailing feature width (a norm's normalised dimension)

Only small, family-independent pieces live here; a family-specific block stays in
its own file.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def token_shift(x: Tensor, last: Tensor) -> Tensor:
    """The previous position's input at every position: ``out[:, t] = x[:, t-1]``,
    ``out[:, 0] = last``.

    RWKV's "time shift" (``nn.ZeroPad2d((0, 0, 1, -1))`` in transformers'
    ``modeling_rwkv``, ``torch.cat((sx.unsqueeze(0), xx[:-1,:]))`` in BlinkDL's
    ``rwkv`` package), generalised to carry the last position of the previous call
    (``last``) instead of zeros, so that a sequence split into pieces gives the
    same result as one call.  Also the causal-conv building block (Mamba keeps
    ``d_conv - 1`` positions; this is the one-position case).

    x:    [B, T, C]
    last: [B, C]    x[:, -1] of the previous piece (zeros at the start of a sequence)
    ->    [B, T, C]
    """
    if x.shape[1] == 1:
        return last.unsqueeze(1).to(x.dtype)  # [B, 1, C] view, no copy
    return torch.cat([last.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Root-mean-square norm over the last dimension, computed in float32.

    Llama's ``LlamaRMSNorm`` (Zhang & Sennrich 2019, "Root Mean Square Layer
    Normalization"): ``x / sqrt(mean(x^2) + eps)`` in float32, cast back to the input
    dtype, then scaled by ``weight`` (Mamba's ``MambaRMSNorm`` and Jamba's
    ``JambaRMSNorm`` are the same function). ``weight=None`` is Falcon Mamba's
    ``rms_forward`` on dt/B/C, which has no learned scale.

    x: [..., X]; weight: [X] or None -> [..., X] in x's dtype
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(x.dtype)
    return h if weight is None else weight * h


class RMSNorm(nn.Module):
    """:func:`rms_norm` with a learned scale (``weight`` initialised to ones)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        if not self.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)
