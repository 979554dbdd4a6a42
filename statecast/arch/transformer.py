"""Decoder-only Transformer in pure PyTorch: GPT-2 style and Llama style from one config.

Mirrors, block by block, transformers' (5.24):
  * ``models/gpt2/modeling_gpt2.py`` (``GPT2LMHeadModel``): learned absolute positions
    added to the token embedding, pre-LayerNorm blocks (``GPT2Block``), fused ``c_attn``
    (split into q/k/v by the converter), ``GPT2MLP`` with gelu_new, ``ln_f``, tied head;
  * ``models/llama/modeling_llama.py`` (``LlamaForCausalLM``): RMSNorm, rotary positions
    (``LlamaRotaryEmbedding``, ``apply_rotary_pos_emb``; llama3 and linear scaling from
    ``modeling_rope_utils``), grouped-query attention (``repeat_kv``), SwiGLU ``LlamaMLP``;
  * ``models/mistral`` (sliding-window mask, ``sliding_window_overlay``) and ``models/qwen2``
    (q/k/v biases without an o bias): the Llama block with config flags.
The shared pieces (``Attention``, ``Rope``, ``MLP``, ``GatedMLP``, norms) live in
``arch/layers.py``, where Jamba takes them from.

Dimension letters used in shape comments:

    B  batch
    T  time (new positions in this call)
    C  d_model      ("hidden_size", "n_embd")
    V  vocab
    L  layers
    H  query heads
    Hkv  key/value heads
    D  head_dim
    P  past length (positions already in the KV state)
    S  P + T

Deviations from the references (numerical only; same function computed):
  * "gelu_new" runs ``F.gelu(approximate="tanh")`` (see ``layers.ACTIVATIONS``).
  * Attention is ``F.scaled_dot_product_attention`` with an explicit additive mask, or with
    ``is_causal`` when the past is empty (``layers.attention_bias``); transformers' sdpa path
    is the same kernel. Grouped-query heads are regrouped instead of copied under a mask
    (``layers.Attention``).
  * Residual additions and the MLP activation run in place on fresh intermediates when
    autograd and export do not need them.
  * The KV state keeps every position, also beyond Mistral's sliding window (transformers'
    ``DynamicSlidingWindowLayer`` drops them); the mask hides them, so logits are the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from statecast.arch.layers import (
    ACTIVATIONS,
    MLP,
    NORMS,
    ROPE_TYPES,
    Attention,
    CausalLM,
    GatedMLP,
    RMSNorm,
    Rope,
    attention_bias,
    config_from_unified,
    embedding,
    every_layer,
    is_exporting,
    make_norm,
    stack_layers,
)

POSITIONS = ("learned", "rope", "none")
MLPS = ("plain", "gated")
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int  # < n_head: grouped-query attention (n_head must be a multiple)
    head_dim: int  # may differ from d_model // n_head (q/k/v widths are heads * head_dim)
    d_ffn: int
    norm: str  # "layernorm" (GPT-2: weight + bias) | "rmsnorm" (Llama: weight)
    norm_eps: float
    mlp: str  # "plain": down(act(up x)) | "gated": down(act(gate x) * up x)
    act: str  # layers.ACTIVATIONS: gelu_new, gelu_pytorch_tanh, gelu, silu, relu
    positions: str  # "learned" (pos_embed table) | "rope" | "none" (NoPE)
    max_positions: int  # learned: table size (a hard limit); rope: informative only
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear", "factor"} / {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"};
    # a plain dict (copied on construction), left out of the hash
    rope_scaling: dict | None = field(default=None, hash=False)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False  # biases of up/down (and gate)
    tie_embeddings: bool = False  # lm head = embed.weight; no lm_head tensor
    sliding_window: int | None = None  # Mistral: a query sees itself and the W-1 keys before it
    attn_scale: float | None = None  # None: 1/sqrt(head_dim); GPT-2 scale_attn_weights=False: 1.0

    def __post_init__(self):
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_ffn", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("mlp", self.mlp, MLPS),
            ("act", self.act, tuple(ACTIVATIONS)),
            ("positions", self.positions, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"TransformerConfig.{name}={value!r}; expected one of {allowed}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {self.sliding_window!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            if self.positions != "rope":
                raise ValueError(f"rope_scaling given but positions={self.positions!r}")
            kind = self.rope_scaling.get("rope_type")
            if kind not in ROPE_TYPES or kind == "default":
                raise ValueError(f"rope_scaling rope_type {kind!r} is not supported; expected one of {tuple(_ROPE_KEYS)}")
            missing = [k for k in _ROPE_KEYS[kind] if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling ({kind}) lacks {missing}")

    @classmethod
    def from_unified(cls, cfg: dict) -> "TransformerConfig":
        """Build from the unified config; other keys ("family", ...) are ignored."""
        return config_from_unified(cls, cfg, "attention")

    def to_unified(self) -> dict:
        return {**asdict(self), "layer_kinds": ["attention"] * self.n_layer}


class KVState(NamedTuple):
    """Keys and values of every past position, stacked over layers (model dtype).

    Returned anew by every call, never mutated. Rotary positions are already applied to
    the keys (as in transformers' caches).
    """

    key: Tensor  # [L, B, Hkv, P, D]
    value: Tensor  # [L, B, Hkv, P, D]


# --------------------------------------------------------------------------- blocks


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)): ``GPT2Block`` / ``LlamaDecoderLayer`` (pre-norm)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        C = cfg.d_model
        self.mixer_norm = make_norm(cfg.norm, C, cfg.norm_eps)  # ln_1 / input_layernorm
        self.attn = Attention(
            C, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.qkv_bias, cfg.o_bias, cfg.sliding_window, cfg.attn_scale
        )
        self.mlp_norm = make_norm(cfg.norm, C, cfg.norm_eps)  # ln_2 / post_attention_layernorm
        mlp_cls = GatedMLP if cfg.mlp == "gated" else MLP
        self.mlp = mlp_cls(C, cfg.d_ffn, cfg.act, cfg.mlp_bias)

    def forward(self, x: Tensor, past_key: Tensor, past_value: Tensor, rope, mask: Tensor | None, kv_out=None):
        # x: [B, T, C]; past_key, past_value: [B, Hkv, P, D] -> x, key, value [B, Hkv, P+T, D]
        a, key, value = self.attn(self.mixer_norm(x), past_key, past_value, rope, mask, kv_out)
        x = _residual(a, x)
        x = _residual(self.mlp(self.mlp_norm(x)), x)
        return x, key, value


def _residual(update: Tensor, x: Tensor) -> Tensor:
    """x + update, written into ``update`` (a fresh projection output) when allowed: one
    [B, T, C] allocation less per addition. Same sum (addition commutes exactly)."""
    if update.requires_grad or is_exporting():
        return x + update
    return update.add_(x)


# --------------------------------------------------------------------------- model


class Transformer(CausalLM):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.d_model
        self.embed = embedding(cfg.vocab_size, C)
        self.pos_embed = (
            embedding(cfg.max_positions, C)
            if cfg.positions == "learned"
            else None
        )
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if cfg.positions == "rope" else None
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.final_norm = make_norm(cfg.norm, C, cfg.norm_eps)  # ln_f / norm
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(C, cfg.vocab_size, bias=False)
        if not self.embed.weight.is_meta:  # a meta model (shapes only) needs no init
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random init after transformers' ``_init_weights`` (``initializer_range`` 0.02):
        linears and embeddings normal(0, std), biases 0, norm weights 1 (LayerNorm bias 0).
        Deviation: GPT-2's extra 1/sqrt(2 n_layer) on ``c_proj`` is not applied."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()

    def state_layers(self) -> dict[str, tuple[int, ...]]:
        return every_layer(KVState._fields, self.cfg.n_layer)

    def init_state(self, batch: int, device=None) -> KVState:
        """An empty history (P = 0)."""
        cfg = self.cfg
        device = self.embed.weight.device if device is None else device
        shape = (cfg.n_layer, batch, cfg.n_kv_head, 0, cfg.head_dim)
        z = torch.zeros(shape, dtype=self.embed.weight.dtype, device=device)
        return KVState(z, z.clone())

    def forward(self, input_ids: Tensor, state: KVState | None = None, *, output_hidden: bool = False):
        """input_ids [B, T] -> logits [B, T, V], new state (+ per-layer residual streams).

        The new tokens take positions P..P+T-1, P = the state's length (read off its
        shape). One code path for every T and P (T = 1 is a decode step); ``state`` None
        means an empty history. ``hidden`` is the residual stream after each block (L
        entries, before the final norm; transformers' ``hidden_states[i + 1]``, except that
        its last entry is after the final norm).
        """
        B, T = input_ids.shape
        if state is None:
            state = self.init_state(B, input_ids.device)
        P = state.key.shape[3]
        x = self.embed_tokens(input_ids)  # [B, T, C]
        dtype, device = x.dtype, x.device
        positions = torch.arange(T, device=device) + P  # [T]
        rope = None
        if self.pos_embed is not None:
            limit = self.cfg.max_positions
            if not is_exporting() and P + T > limit:  # (no guard on symbolic shapes when exporting)
                raise ValueError(
                    f"positions {P}..{P + T - 1} exceed the learned position table (max_positions={limit}): "
                    f"the model has no embedding for positions >= {limit}"
                )
            x = x + self.pos_embed(positions)  # GPT2Model: inputs_embeds + position_embeds
        elif self.rope is not None:
            rope = self.rope.cos_sin(positions, dtype)  # [T, D] each
        mask = attention_bias(T, P, self.cfg.sliding_window, dtype, device)  # shared by all layers
        # Eager inference writes each layer's keys/values straight into the new stacked state
        # (one copy of the history per call, as transformers' DynamicCache.update); autograd
        # and export take the functional form, per-layer cat then stack (same values).
        # Decode cost to know: the new state is one fresh allocation per call; past glibc's
        # 32 MB mmap ceiling its pages fault in anew on every step (GPT-2 small at P=960,
        # 1 thread: 73 ms/token vs 46 with GLIBC_TUNABLES raising mmap/trim thresholds;
        # transformers' per-layer 3 MB tensors stay below it: 41 ms).
        direct = not (torch.is_grad_enabled() or is_exporting())
        if direct:
            L, _, Hkv, _, D = state.key.shape
            new = KVState(*(state.key.new_empty(L, B, Hkv, P + T, D) for _ in range(2)))
        keys, values, hidden = [], [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, state.key[i], state.value[i], rope, mask, (new.key[i], new.value[i]) if direct else None)
            keys.append(k)
            values.append(v)
            if output_hidden:
                hidden.append(x)
        x = self.final_norm(x)
        logits = self.head_logits(x)  # [B, T, V]
        if not direct:
            new = KVState(stack_layers(keys), stack_layers(values))
        if output_hidden:
            return logits, new, hidden
        return logits, new
