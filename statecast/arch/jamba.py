"""Jamba in pure PyTorch: attention and Mamba layers interleaved, some MLPs replaced by a
mixture of experts (Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba Language Model").

Composed from the pieces the other families use, none copied:
  * attention: ``layers.Attention`` without positional encoding (Jamba's attention has no
    rotary or learned positions: the Mamba layers carry order), grouped-query heads;
  * Mamba: ``mamba.MambaMixer`` with weighted dt/B/C RMSNorms (``bcdt_norm="rms_weighted"``,
    transformers' ``JambaMambaMixer``);
  * feed-forward: ``layers.GatedMLP`` (``JambaMLP``) or ``layers.MoE`` (``JambaSparseMoeBlock``:
    softmax router, top-k probabilities NOT renormalised);
  * norms: ``layers.RMSNorm`` (``JambaRMSNorm``).
Block by block it mirrors transformers' (5.24) ``models/jamba/modeling_jamba.py``:
``JambaAttentionDecoderLayer`` / ``JambaMambaDecoderLayer`` are both
``x + mixer(input_layernorm(x))`` then ``x + feed_forward(pre_ff_layernorm(x))``, residual in
the model dtype (no float32 residual, unlike Mamba's blocks); ``final_layernorm``; untied head.

Which layer is which comes from explicit per-layer lists in the config (``layer_kinds``,
``ffn_kinds``), not from Jamba's period/offset rule, so any layout works.

Dimension letters used in shape comments:

    B  batch
    T  time (new positions in this call)
    C  d_model
    V  vocab
    La attention layers,  Lm Mamba layers
    Hkv  key/value heads, D head_dim, P past length (positions in the KV state)
    E  d_inner (Mamba), N d_state, W d_conv
    F  d_ffn, X experts (k chosen per token)
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
    MoE,
    RMSNorm,
    attention_bias,
    config_from_unified,
    embedding,
    stack_layers,
)
from statecast.arch.mamba import MambaMixer

LAYER_KINDS = ("attention", "mamba")
FFN_KINDS = ("mlp", "moe")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class JambaConfig:
    vocab_size: int
    d_model: int
    n_layer: int
    layer_kinds: tuple[str, ...]  # per layer: "attention" | "mamba"
    ffn_kinds: tuple[str, ...]  # per layer: "mlp" (dense gated MLP) | "moe"
    n_head: int
    n_kv_head: int
    head_dim: int
    d_ffn: int  # dense MLP and every expert (HF intermediate_size)
    n_experts: int  # X (HF num_experts); 1 when no layer is "moe"
    top_k: int  # experts per token (HF num_experts_per_tok)
    d_inner: int  # Mamba E (HF mamba_expand * hidden_size)
    d_state: int
    d_conv: int
    dt_rank: int
    act: str = "silu"
    norm_eps: float = 1e-6  # every RMSNorm, also the dt/B/C norms (HF rms_norm_eps)
    proj_bias: bool = False  # Mamba in_proj/out_proj bias (HF mamba_proj_bias)
    conv_bias: bool = True  # HF mamba_conv_bias
    tie_embeddings: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layer_kinds", tuple(self.layer_kinds))
        object.__setattr__(self, "ffn_kinds", tuple(self.ffn_kinds))
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_ffn", "n_experts",
                     "top_k", "d_inner", "d_state", "dt_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"JambaConfig.{name} must be a positive integer, got {value!r}")
        for name, allowed in (("layer_kinds", LAYER_KINDS), ("ffn_kinds", FFN_KINDS)):
            kinds = getattr(self, name)
            if len(kinds) != self.n_layer or any(k not in allowed for k in kinds):
                raise ValueError(f"JambaConfig.{name} must list one of {allowed} for each of {self.n_layer} layers, got {list(kinds)}")
        if "moe" in self.ffn_kinds and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be in 1..n_experts ({self.n_experts})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"JambaConfig.act={self.act!r}; expected one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_unified(cls, cfg: dict) -> "JambaConfig":
        """Build from the unified config; other keys ("family", ...) are ignored."""
        return config_from_unified(cls, cfg, None)

    def to_unified(self) -> dict:
        return {**asdict(self), "layer_kinds": list(self.layer_kinds), "ffn_kinds": list(self.ffn_kinds)}

    def layers_of(self, kind: str) -> tuple[int, ...]:
        """Model layer indices of the layers of ``kind`` ("attention" or "mamba"), ascending."""
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == kind)


class JambaState(NamedTuple):
    """One stack per kind of state, holding only the layers that have it (never a
    placeholder): rows of ``key``/``value`` are the attention layers in order, rows of
    ``conv``/``ssm`` the Mamba layers (``Jamba.state_layers`` names them). Returned anew
    by every call, never mutated."""

    key: Tensor  # [La, B, Hkv, P, D] model dtype
    value: Tensor  # [La, B, Hkv, P, D]
    conv: Tensor  # [Lm, B, E, W-1] model dtype
    ssm: Tensor  # [Lm, B, E, N] float32


# --------------------------------------------------------------------------- block / model


class JambaBlock(nn.Module):
    """x + mixer(mixer_norm(x)), then x + ffn(mlp_norm(x)). The mixer is ``attn`` or ``mamba``;
    the feed-forward is ``mlp`` or ``moe`` (the attribute names are the canonical tensor names)."""

    def __init__(self, cfg: JambaConfig, i: int):
        super().__init__()
        C = cfg.d_model
        self.kind, self.ffn_kind = cfg.layer_kinds[i], cfg.ffn_kinds[i]
        self.mixer_norm = RMSNorm(C, eps=cfg.norm_eps)  # input_layernorm
        if self.kind == "attention":
            self.attn = Attention(C, cfg.n_head, cfg.n_kv_head, cfg.head_dim)
        else:
            self.mamba = MambaMixer(C, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.dt_rank, proj_bias=cfg.proj_bias,
                                    conv_bias=cfg.conv_bias, bcdt_norm="rms_weighted", bcdt_norm_eps=cfg.norm_eps)
        self.mlp_norm = RMSNorm(C, eps=cfg.norm_eps)  # pre_ff_layernorm
        if self.ffn_kind == "moe":
            self.moe = MoE(C, cfg.d_ffn, cfg.n_experts, cfg.top_k, cfg.act)
        else:
            self.mlp = GatedMLP(C, cfg.d_ffn, cfg.act)

    def forward(self, x: Tensor, s1: Tensor, s2: Tensor, mask: Tensor | None):
        """x [B, T, C]; (s1, s2) this layer's state: (key, value) [B, Hkv, P, D] for attention,
        (conv, ssm) for Mamba -> x, and the new (s1, s2)."""
        h = self.mixer_norm(x)
        if self.kind == "attention":
            out, s1, s2 = self.attn(h, s1, s2, None, mask)
        else:
            out, s1, s2 = self.mamba(h, s1, s2)
        x = x + out
        h = self.mlp_norm(x)
        return x + (self.moe(h) if self.ffn_kind == "moe" else self.mlp(h)), s1, s2


class Jamba(CausalLM):
    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.d_model
        self.embed = embedding(cfg.vocab_size, C)
        self.layers = nn.ModuleList(JambaBlock(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = RMSNorm(C, eps=cfg.norm_eps)  # final_layernorm
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(C, cfg.vocab_size, bias=False)
        # row of each layer in its kind's state stack
        self._row = {i: cfg.layers_of(kind).index(i) for kind in LAYER_KINDS for i in cfg.layers_of(kind)}
        if not self.embed.weight.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random init after transformers' ``JambaPreTrainedModel._init_weights``
        (initializer_range 0.02): linears, embeddings, router and experts normal(0, std),
        norms ones; each Mamba mixer as ``MambaMixer.reset_parameters`` (S4D-real A_log,
        D = 1, inverse-softplus dt bias) with its projections drawn with ``std``."""
        def normal(*params):
            for p in params:
                p.normal_(0.0, std, generator=generator)

        normal(self.embed.weight)
        for layer in self.layers:
            layer.mixer_norm.reset_parameters()
            layer.mlp_norm.reset_parameters()
            if layer.kind == "attention":
                normal(*(lin.weight for lin in (layer.attn.q, layer.attn.k, layer.attn.v, layer.attn.o)))
            else:
                layer.mamba.reset_parameters(generator, init_std=std)
            if layer.ffn_kind == "moe":
                normal(layer.moe.router.weight, layer.moe.gate, layer.moe.up, layer.moe.down)
            else:
                normal(layer.mlp.gate.weight, layer.mlp.up.weight, layer.mlp.down.weight)
        self.final_norm.reset_parameters()
        if self.lm_head is not None:
            normal(self.lm_head.weight)

    def state_layers(self) -> dict[str, tuple[int, ...]]:
        """Model layer index of each row of each state field."""
        attn, mamba = self.cfg.layers_of("attention"), self.cfg.layers_of("mamba")
        return {"key": attn, "value": attn, "conv": mamba, "ssm": mamba}

    def init_state(self, batch: int, device=None) -> JambaState:
        """An empty history: P = 0 past positions, zero conv inputs and SSM states."""
        cfg = self.cfg
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype
        La, Lm = len(cfg.layers_of("attention")), len(cfg.layers_of("mamba"))
        kv = torch.zeros(La, batch, cfg.n_kv_head, 0, cfg.head_dim, dtype=dtype, device=device)
        conv = torch.zeros(Lm, batch, cfg.d_inner, cfg.d_conv - 1, dtype=dtype, device=device)
        ssm = torch.zeros(Lm, batch, cfg.d_inner, cfg.d_state, dtype=torch.float32, device=device)
        return JambaState(kv, kv.clone(), conv, ssm)

    def forward(self, input_ids: Tensor, state: JambaState | None = None, *, output_hidden: bool = False):
        """input_ids [B, T] -> logits [B, T, V], new state (+ per-layer residual streams).

        One code path for every T (T = 1 is a decode step); the attention layers see the P
        positions of the state plus the T new ones, the Mamba layers run their
        whole-sequence scan (T > 1) or one-step recurrence (T = 1) from their state.
        ``hidden``: the residual stream after each block (before the final norm).
        """
        B, T = input_ids.shape
        if state is None:
            state = self.init_state(B, input_ids.device)
        P = state.key.shape[3]
        x = self.embed_tokens(input_ids)  # [B, T, C]
        mask = attention_bias(T, P, None, x.dtype, x.device)  # [T, P+T] or None (causal kernel)
        new = {f: [] for f in JambaState._fields}
        hidden = []
        for i, layer in enumerate(self.layers):
            r = self._row[i]
            if layer.kind == "attention":
                x, k, v = layer(x, state.key[r], state.value[r], mask)
                new["key"].append(k)
                new["value"].append(v)
            else:
                x, conv, ssm = layer(x, state.conv[r], state.ssm[r], None)
                new["conv"].append(conv)
                new["ssm"].append(ssm)
            if output_hidden:
                hidden.append(x)
        x = self.final_norm(x)
        logits = self.head_logits(x)  # [B, T, V]
        state = JambaState(*(stack_layers(new[f]) if new[f] else _grown(getattr(state, f), T) for f in JambaState._fields))
        if output_hidden:
            return logits, state, hidden
        return logits, state


def _grown(empty_stack: Tensor, T: int) -> Tensor:
    """The stack of a kind no layer has (zero rows): unchanged, except that an empty KV
    stack's length grows by T so P keeps counting positions."""
    if empty_stack.dim() == 5:
        shape = list(empty_stack.shape)
        shape[3] += T
        return empty_stack.new_zeros(shape)
    return empty_stack
