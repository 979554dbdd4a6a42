"""Zamba in pure PyTorch: a Mamba backbone and ONE shared attention + MLP block, applied at
the "hybrid" layers to the residual stream concatenated with the token embeddings (Glorioso et
al. 2024, "Zamba: A Compact 7B SSM Hybrid Model", fig. 2 and eq. 6).

Composed from the pieces the other families use, none copied:
  * Mamba: ``mamba.MambaMixer`` with ``n_heads`` = Zamba's ``n_mamba_heads`` (transformers'
    ``ZambaMambaMixer``: per-head x_proj / dt_proj / A_log / D, one in_proj, conv and out_proj);
  * attention: ``layers.Attention`` reading 2C features (``d_in``) and writing C, no positional
    encoding (Zamba's attention has no rotary or learned positions), grouped-query heads,
    scale (D/2)^-0.5 instead of D^-0.5 (``ZambaAttention.scaling``), causal mask, no window;
  * MLP: ``layers.GatedMLP`` (``ZambaMLP``, gelu by default); norms ``layers.RMSNorm``.
Block by block it mirrors transformers' (5.24) ``models/zamba/modeling_zamba.py``:
  * ``ZambaAttentionDecoderLayer`` (:class:`SharedBlock`), WITHOUT residuals:
    s = mlp(mlp_norm(attn(mixer_norm(cat(x, emb)))));
  * ``ZambaHybridLayer``: t = linear(s) (``shared_proj``, one per hybrid layer), then the
    layer's Mamba decoder with t added to its input only: x + mamba(mixer_norm(x + t));
  * ``ZambaMambaDecoderLayer``: x + mamba(mixer_norm(x)) (``input_layernorm``), the residual
    in the model dtype (no float32 residual, unlike Mamba-1's blocks);
  * ``ZambaModel`` (``emb`` = the embedding output, ``final_layernorm``) and
    ``ZambaForCausalLM`` (head tied to the embedding by default).
The shared block's weights exist once (``shared.{b}.*``); each hybrid layer that runs it
attends at its own depth, so each keeps its own keys and values (transformers' cache indexes
them by that layer, ``cache.update(..., layer_idx)``). Every layer has a Mamba mixer and so
conv / SSM state; a hybrid layer has both kinds.

Layout, from explicit per-layer lists (not Zamba's period/offset rule, whose first three
layers are fixed at mamba, mamba, hybrid): ``layer_kinds[i]`` is "mamba" or "hybrid",
``shared_blocks[i]`` the index of the shared block hybrid layer i runs (None for a Mamba
layer). Zamba has one block (every hybrid layer runs block 0) -- as transformers runs it:
its ``ZambaModel`` builds a block per hybrid layer and ties them to the first only when
``tie_word_embeddings`` is true (``get_expanded_tied_weights_keys`` ties nothing otherwise),
so an untied ZambaForCausalLM has an independent block per hybrid layer, which the unified
config says as blocks 0, 1, 2, ... (``families/zamba.py``). Zamba2 (``arch/zamba2.py``)
alternates several blocks and reuses :class:`SharedBlock`.
``shared_copies`` (per block, the hybrid layers under which the Hugging Face checkpoint stored
a copy of it) is a fact about that checkpoint's file, kept for writing it back; the model
does not read it.

Dimension letters used in shape comments:

    B  batch
    T  time (new positions in this call)
    C  d_model (the shared block reads 2C: [x | emb])
    V  vocab
    L  layers, La hybrid layers (those with KV state)
    H  attention heads, Hkv key/value heads, D head_dim, P past length
    F  d_ffn
    E  d_inner (Mamba), Hm Mamba heads, N d_state, W d_conv
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from statecast.arch.layers import (
    ACTIVATIONS,
    Attention,
    CausalLM,
    GatedMLP,
    RMSNorm,
    attention_bias,
    config_from_unified,
    embedding,
    stack_layers,
)
from statecast.arch.mamba import MambaMixer

LAYER_KINDS = ("mamba", "hybrid")


def check_layout(cls_name: str, n_layer: int, layer_kinds: tuple, shared_blocks: tuple, kinds: tuple = LAYER_KINDS,
                 shared_copies: tuple | None = None) -> int:
    """The hybrid layout of a Zamba-style config: one of ``kinds`` (the Mamba kind, "hybrid")
    per layer, a block index exactly on the hybrid layers, blocks numbered 0..n-1 with each
    used; ``shared_copies``, when given, one ascending non-empty list per block of layers that
    run it. Returns the number of blocks."""
    if len(layer_kinds) != n_layer or any(k not in kinds for k in layer_kinds):
        raise ValueError(f"{cls_name}.layer_kinds must list one of {kinds} for each of {n_layer} layers, "
                         f"got {list(layer_kinds)}")
    if len(shared_blocks) != n_layer or any((b is None) != (k != "hybrid") for k, b in zip(layer_kinds, shared_blocks)):
        raise ValueError(f"{cls_name}.shared_blocks must give a block index for each hybrid layer and null for each "
                         f"mamba layer, got {list(shared_blocks)}")
    used = sorted({b for b in shared_blocks if b is not None})
    if not used or used != list(range(len(used))):
        raise ValueError(f"{cls_name}.shared_blocks must use blocks 0..n-1 (at least one hybrid layer), got {list(shared_blocks)}")
    if shared_copies is not None:
        users = [[i for i, b in enumerate(shared_blocks) if b == block] for block in used]
        if len(shared_copies) != len(used) or any(not c or list(c) != sorted(set(c)) or not set(c) <= set(u)
                                                  for c, u in zip(shared_copies, users)):
            raise ValueError(f"{cls_name}.shared_copies must give, for each of the {len(used)} shared blocks, an ascending "
                             f"non-empty list of layers that run it (they run {users}), got {_lists(shared_copies)}")
    return len(used)


def _lists(x):
    return [list(c) if isinstance(c, (list, tuple)) else c for c in x]


def copies_tuple(copies) -> tuple[tuple[int, ...], ...] | None:
    """``shared_copies`` as the frozen config holds it (tuples; None stays None)."""
    return None if copies is None else tuple(tuple(c) if isinstance(c, (list, tuple)) else c for c in copies)


def copies_list(copies) -> list[list[int]] | None:
    """... and as the unified config (JSON) holds it."""
    return None if copies is None else [list(c) for c in copies]


# --------------------------------------------------------------------------- config


class SharedLayout:
    """What the configs of Zamba and Zamba2 share: the per-layer layout (``layer_kinds``,
    ``shared_blocks``, ``shared_copies``), checked and frozen by :meth:`_freeze_layout`, and
    its conversions to and from the unified config."""

    LAYER_KINDS: tuple[str, ...] = LAYER_KINDS

    def _freeze_layout(self) -> None:
        object.__setattr__(self, "layer_kinds", tuple(self.layer_kinds))
        object.__setattr__(self, "shared_blocks", tuple(self.shared_blocks))
        object.__setattr__(self, "shared_copies", copies_tuple(self.shared_copies))
        check_layout(type(self).__name__, self.n_layer, self.layer_kinds, self.shared_blocks, self.LAYER_KINDS,
                     self.shared_copies)

    @classmethod
    def from_unified(cls, cfg: dict):
        """Build from the unified config; other keys ("family", ...) are ignored."""
        return config_from_unified(cls, cfg, None)

    def to_unified(self) -> dict:
        return {**asdict(self), "layer_kinds": list(self.layer_kinds), "shared_blocks": list(self.shared_blocks),
                "shared_copies": copies_list(self.shared_copies)}

    @property
    def n_shared(self) -> int:
        """How many shared blocks there are (their indices are 0..n_shared-1)."""
        return 1 + max(b for b in self.shared_blocks if b is not None)

    def hybrid_layers(self) -> tuple[int, ...]:
        """Model layer indices of the hybrid layers (the rows of the KV state), ascending."""
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "hybrid")


@dataclass(frozen=True)
class ZambaConfig(SharedLayout):
    vocab_size: int
    d_model: int
    n_layer: int
    layer_kinds: tuple[str, ...]  # per layer: "mamba" | "hybrid" (the shared block, its linear, then Mamba)
    shared_blocks: tuple[int | None, ...]  # per layer: the shared block a hybrid layer runs; None: a Mamba layer
    n_head: int
    n_kv_head: int
    head_dim: int  # HF attention_head_dim (2C / n_head by default)
    d_ffn: int
    d_inner: int  # E (HF mamba_expand * hidden_size)
    d_state: int
    d_conv: int
    dt_rank: int
    n_mamba_heads: int  # Hm (HF n_mamba_heads); E % Hm == 0
    act: str = "gelu"  # the shared MLP's (HF hidden_act)
    norm_eps: float = 1e-5  # every RMSNorm (HF rms_norm_eps)
    proj_bias: bool = False  # Mamba in_proj / out_proj bias (HF mamba_proj_bias)
    conv_bias: bool = True  # HF mamba_conv_bias
    tie_embeddings: bool = True
    # per shared block, the hybrid layers under which its Hugging Face checkpoint held a copy
    # (families/zamba.py); None: under the first layer that runs it, as transformers saves it
    shared_copies: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_ffn", "d_inner",
                     "d_state", "dt_rank", "n_mamba_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ZambaConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.d_conv, int) or self.d_conv < 2:
            raise ValueError(f"ZambaConfig.d_conv must be an integer >= 2, got {self.d_conv!r}")
        self._freeze_layout()
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.d_inner % self.n_mamba_heads:
            raise ValueError(f"d_inner ({self.d_inner}) must be a multiple of n_mamba_heads ({self.n_mamba_heads})")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"ZambaConfig.act={self.act!r}; expected one of {sorted(ACTIVATIONS)}")


class ZambaState(NamedTuple):
    """Rows of ``key``/``value``: the hybrid layers in order (each use of the shared block
    attends at its own depth); rows of ``conv``/``ssm``: every layer. Returned anew by every
    call, never mutated. Zamba2 (``arch/zamba2.py``) has the same fields, with its Mamba-2
    mixers' conv [L, B, E + 2GN, W-1] and ssm [L, B, Hm, Pm, N]."""

    key: Tensor  # [La, B, Hkv, P, D] model dtype
    value: Tensor  # [La, B, Hkv, P, D]
    conv: Tensor  # [L, B, E, W-1] model dtype
    ssm: Tensor  # [L, B, E, N] float32


# --------------------------------------------------------------------------- blocks


class SharedBlock(nn.Module):
    """The shared attention + MLP block (``ZambaAttentionDecoderLayer``; Zamba2's
    ``Zamba2AttentionDecoderLayer`` with its rotary positions and per-use adapters passed in):
    mlp(mlp_norm(attn(mixer_norm([x | emb])))), no residual inside. Stored once (``shared.{b}``),
    called by every hybrid layer that uses it."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, head_dim: int, d_ffn: int, act: str, eps: float,
                 mlp_bias: bool = False):
        super().__init__()
        C = d_model
        self.mixer_norm = RMSNorm(2 * C, eps=eps)  # input_layernorm, over [x | emb]
        # ZambaAttention / Zamba2Attention: scaling = (head_dim / 2) ** -0.5
        self.attn = Attention(C, n_head, n_kv_head, head_dim, scale=(head_dim / 2) ** -0.5, d_in=2 * C)
        self.mlp_norm = RMSNorm(C, eps=eps)  # pre_ff_layernorm
        self.mlp = GatedMLP(C, d_ffn, act, bias=mlp_bias)  # feed_forward (Zamba2: gate_up_proj split in two)

    def forward(self, x: Tensor, emb: Tensor, past_key: Tensor, past_value: Tensor, rope=None, mask: Tensor | None = None,
                attn_adapter: nn.ModuleDict | None = None, mlp_adapter: nn.Module | None = None):
        """x, emb [B, T, C]; past_key, past_value [B, Hkv, P, D] (this use's); the use's
        adapters (Zamba2: LoRAs on q/k/v, on gate|up) -> out [B, T, C], key, value [B, Hkv, P+T, D]."""
        h = self.mixer_norm(torch.cat([x, emb], dim=-1))  # [B, T, 2C]
        a, key, value = self.attn(h, past_key, past_value, rope, mask, adapters=attn_adapter)  # [B, T, C]
        return self.mlp(self.mlp_norm(a), mlp_adapter), key, value


class HybridLayer(nn.Module):
    """One layer of Zamba or Zamba2: x + mamba(mixer_norm(x [+ t])), t = shared_proj(the shared
    block's output) on a hybrid layer (``ZambaHybridLayer``'s ``linear``, then its
    ``mamba_decoder``). ``mamba`` is the layer's mixer (Mamba-1 multi-head for Zamba, Mamba-2
    for Zamba2); a Zamba2 hybrid layer also holds its adapters for the shared block."""

    def __init__(self, kind: str, block: int | None, d_model: int, eps: float, mamba: nn.Module,
                 attn_adapter: nn.ModuleDict | None = None, mlp_adapter: nn.Module | None = None):
        super().__init__()
        C = d_model
        self.kind, self.block = kind, block
        self.mixer_norm = RMSNorm(C, eps=eps)  # input_layernorm
        self.mamba = mamba
        self.attn_adapter, self.mlp_adapter = attn_adapter, mlp_adapter
        if self.kind == "hybrid":
            self.shared_proj = nn.Linear(C, C, bias=False)  # HF linear

    def forward(self, x: Tensor, shared: Tensor | None, conv: Tensor, ssm: Tensor):
        """x [B, T, C]; shared: the shared block's output [B, T, C] (hybrid layers) or None
        -> x, new conv, new ssm."""
        h = x if shared is None else x + self.shared_proj(shared)  # eq. 6: added to the Mamba input only
        out, conv, ssm = self.mamba(self.mixer_norm(h), conv, ssm)
        return x + out, conv, ssm


# --------------------------------------------------------------------------- model


class SharedBlockLM(CausalLM):
    """The model around the layers, as Zamba and Zamba2 share it: the state (each use of a
    shared block its own KV rows, every layer its mixer's conv / SSM state) and the forward.
    A subclass builds ``embed``, ``layers``, ``shared``, ``final_norm``, ``lm_head``, ``_kv_row``,
    sets ``rope`` (None: no positions) and gives its mixers' state shapes (``mixer_state``)."""

    rope = None  # Zamba's attention has no positions; Zamba2's rotary ones with use_mem_rope

    def mixer_state(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One layer's conv and SSM state shapes, without the batch axis."""
        raise NotImplementedError

    def state_layers(self) -> dict[str, tuple[int, ...]]:
        """Model layer index of each row of each state field."""
        hybrid, every = self.cfg.hybrid_layers(), tuple(range(self.cfg.n_layer))
        return {"key": hybrid, "value": hybrid, "conv": every, "ssm": every}

    def init_state(self, batch: int, device=None) -> ZambaState:
        """An empty history: P = 0 past positions, zero conv inputs and SSM states (float32)."""
        cfg = self.cfg
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype
        kv = torch.zeros(len(cfg.hybrid_layers()), batch, cfg.n_kv_head, 0, cfg.head_dim, dtype=dtype, device=device)
        conv_shape, ssm_shape = self.mixer_state()
        conv = torch.zeros(cfg.n_layer, batch, *conv_shape, dtype=dtype, device=device)
        ssm = torch.zeros(cfg.n_layer, batch, *ssm_shape, dtype=torch.float32, device=device)
        return ZambaState(kv, kv.clone(), conv, ssm)

    def forward(self, input_ids: Tensor, state: ZambaState | None = None, *, output_hidden: bool = False):
        """input_ids [B, T] -> logits [B, T, V], new state (+ per-layer residual streams).

        One code path for every T (T = 1 is a decode step): each use of a shared block
        attends over its own P past positions plus the T new ones (at positions P..P+T-1 for
        rotary positions); the Mamba mixers run their whole-sequence path (T > 1) or one-step
        recurrence (T = 1) from their state. ``hidden``: the residual stream after each layer
        (transformers' hooked layer outputs).
        """
        B, T = input_ids.shape
        if state is None:
            state = self.init_state(B, input_ids.device)
        P = state.key.shape[3]
        x = self.embed_tokens(input_ids)  # [B, T, C]; also the blocks' second input (original_hidden_states)
        rope = None if self.rope is None else self.rope.cos_sin(torch.arange(T, device=x.device) + P, x.dtype)
        mask = attention_bias(T, P, None, x.dtype, x.device)  # [T, P+T] or None (causal kernel)
        x, new, hidden = run_layers(self, x, x, state, lambda i: (rope, mask), output_hidden)
        logits = self.head_logits(self.final_norm(x))  # [B, T, V]
        state = ZambaState(*(stack_layers(new[f]) for f in ZambaState._fields))
        if output_hidden:
            return logits, state, hidden
        return logits, state


class Zamba(SharedBlockLM):
    def __init__(self, cfg: ZambaConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.d_model
        self.embed = embedding(cfg.vocab_size, C)
        self.layers = nn.ModuleList(
            HybridLayer(kind, block, C, cfg.norm_eps,
                        MambaMixer(C, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.dt_rank, n_heads=cfg.n_mamba_heads,
                                   proj_bias=cfg.proj_bias, conv_bias=cfg.conv_bias))
            for kind, block in zip(cfg.layer_kinds, cfg.shared_blocks))
        self.shared = nn.ModuleList(SharedBlock(C, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ffn, cfg.act, cfg.norm_eps)
                                    for _ in range(cfg.n_shared))
        self.final_norm = RMSNorm(C, eps=cfg.norm_eps)  # final_layernorm
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(C, cfg.vocab_size, bias=False)
        self._kv_row = {i: r for r, i in enumerate(cfg.hybrid_layers())}
        if not self.embed.weight.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random init after transformers' ``ZambaPreTrainedModel._init_weights`` (initializer_range
        0.02): linears and embedding normal(0, std), norms ones; each Mamba mixer as
        ``MambaMixer.reset_parameters`` (S4D-real A_log, D = 1, inverse-softplus dt bias) with
        its projections drawn with ``std``."""
        linears = [self.embed, *(m for b in self.shared for m in b.modules() if isinstance(m, nn.Linear))]
        linears += [layer.shared_proj for layer in self.layers if layer.kind == "hybrid"]
        for module in linears + ([self.lm_head] if self.lm_head is not None else []):
            module.weight.normal_(0.0, std, generator=generator)
        for norm in (m for m in self.modules() if isinstance(m, RMSNorm)):
            norm.reset_parameters()
        for layer in self.layers:
            layer.mamba.reset_parameters(generator, init_std=std)

    def mixer_state(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """conv [E, W-1], ssm [E, N] (Mamba-1's, whatever the head count)."""
        cfg = self.cfg
        return (cfg.d_inner, cfg.d_conv - 1), (cfg.d_inner, cfg.d_state)


def run_layers(model: nn.Module, x: Tensor, emb: Tensor, state, rope_mask, output_hidden: bool):
    """The layer loop of Zamba and Zamba2: each hybrid layer runs its shared block
    (``model.shared[block]``) on its own KV rows, then every layer its Mamba mixer.
    ``rope_mask(i)`` -> (rope, mask) for hybrid layer i. Returns the last residual stream, the new per-layer state tensors by
    field, and the per-layer residual streams (``output_hidden``)."""
    new: dict[str, list[Tensor]] = {f: [] for f in ("key", "value", "conv", "ssm")}
    hidden = []
    for i, layer in enumerate(model.layers):
        shared = None
        if layer.kind == "hybrid":
            r = model._kv_row[i]
            rope, mask = rope_mask(i)
            shared, key, value = model.shared[layer.block](x, emb, state.key[r], state.value[r], rope, mask,
                                                           layer.attn_adapter, layer.mlp_adapter)
            new["key"].append(key)
            new["value"].append(value)
        x, conv, ssm = layer(x, shared, state.conv[i], state.ssm[i])
        new["conv"].append(conv)
        new["ssm"].append(ssm)
        if output_hidden:
            hidden.append(x)
    return x, new, hidden
