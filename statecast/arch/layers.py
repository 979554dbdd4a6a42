"""Shared building blocks for the statecast architectures (pure PyTorch, no I/O).

Dimension letters used in the shape comments (each model file repeats the ones it uses):

    B  batch
    T  time (sequence length)
    C  d_model (residual stream width)

Only small, family-independent pieces live here; a family-specific block stays in
its own file.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
