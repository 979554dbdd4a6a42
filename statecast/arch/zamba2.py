"""Zamba2 in pure PyTorch: Mamba-2 layers and ``num_mem_blocks`` shared attention + MLP
blocks, used in turn at the hybrid layers, each use with its own LoRA adapters and its own
linear after the block (Glorioso et al. 2024, "The Zamba2 Suite: Technical Report", fig. 2).

Composed from the pieces the other families use, none copied:
  * Mamba-2: ``mamba2.Mamba2Mixer`` (transformers' ``Zamba2MambaMixer``: the same [z | xBC | dt]
    in_proj, grouped B/C, gated RMS norm with eps 1e-5, dt clamped below by time_step_min on the
    whole-sequence path, conv bias always on); its tensors carry the Mamba-2 family's names;
  * the shared block, each hybrid layer and the layer loop: ``arch.zamba``'s ``SharedBlock``,
    ``HybridLayer`` and ``run_layers`` (Zamba's structure, which Zamba2 keeps: no residual inside
    the block, its output through the layer's ``linear`` added to the Mamba input only);
  * the adapters: ``layers.LoRA`` -- per hybrid layer one on each of q, k, v (only with
    ``use_shared_attention_adapter``; ``Zamba2Attention.linear_{q,k,v}_adapter_list``) and one on
    the MLP's gate|up projection (always, as transformers 5.24 builds them:
    ``Zamba2MLP.gate_up_proj_adapter_list``), added to those projections of this use's input;
  * rotary positions on q and k when ``use_mem_rope`` (``Zamba2RotaryEmbedding``: head_dim =
    attention_head_dim, ``layers.Rope``); the attention scale is (head_dim/2)^-0.5 as in Zamba.
Block by block it mirrors transformers' (5.24) ``models/zamba2/modeling_zamba2.py``
(``Zamba2HybridLayer``, ``Zamba2MambaDecoderLayer``, ``Zamba2AttentionDecoderLayer``,
``Zamba2Model``, ``Zamba2ForCausalLM``). Which block a hybrid layer runs is
``shared_blocks[i]`` (transformers: the j-th hybrid layer runs block j % num_mem_blocks); the
adapters belong to the layer that uses them (``layers.{i}.attn_adapter.{q,k,v}``,
``layers.{i}.mlp_adapter``), wherever transformers stores them (inside the block, by j).

Dimension letters used in shape comments:

    B  batch
    T  time (new positions in this call)
    C  d_model (the shared blocks read 2C)
    V  vocab
    L  layers, La hybrid layers
    H  attention heads, Hkv key/value heads, D head_dim, P past length
    F  d_ffn, r adapter rank
    E  d_inner = Hm * Pm (Mamba-2: Hm heads of Pm channels), G groups, N d_state, W d_conv,
    Dc conv channels E + 2 G N
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from statecast.arch.layers import (
    ACTIVATIONS,
    ROPE_TYPES,
    LoRA,
    RMSNorm,
    Rope,
    embedding,
)
from statecast.arch.mamba2 import CHUNK_SIZE, Mamba2Mixer
from statecast.arch.zamba import HybridLayer, SharedBlock, SharedBlockLM, SharedLayout

LAYER_KINDS = ("mamba2", "hybrid")
POSITIONS = ("rope", "none")
ZAMBA2_GATED_NORM_EPS = 1e-5  # Zamba2MambaMixer's Zamba2RMSNormGated(eps=1e-5), whatever rms_norm_eps says


@dataclass(frozen=True)
class Zamba2Config(SharedLayout):
    vocab_size: int
    d_model: int
    n_layer: int
    layer_kinds: tuple[str, ...]  # per layer: "mamba2" | "hybrid" (a shared block's use, its linear, then Mamba-2)
    shared_blocks: tuple[int | None, ...]  # per layer: the shared block a hybrid layer runs; None: a Mamba-2 layer
    n_head: int
    n_kv_head: int
    head_dim: int  # HF attention_head_dim = 2C / n_head
    d_ffn: int
    n_mamba_heads: int  # Hm
    mamba_head_dim: int  # Pm (HF mamba_headdim = E / Hm)
    d_state: int
    n_groups: int = 1  # G (HF mamba_ngroups)
    d_conv: int = 4
    chunk_size: int = CHUNK_SIZE
    adapter_rank: int = 128
    attn_adapters: bool = False  # LoRAs on q/k/v (HF use_shared_attention_adapter); the MLP's are always there
    positions: str = "none"  # "rope" (HF use_mem_rope) | "none"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)  # as TransformerConfig's
    act: str = "gelu"
    norm_eps: float = 1e-5  # the RMSNorms (HF rms_norm_eps); the mixers' gated norms use 1e-5
    proj_bias: bool = False  # HF add_bias_linear: Mamba in_proj / out_proj and the MLP's biases
    dt_limit_min: float = 0.001  # HF time_step_min: dt clamped from below on the whole-sequence path
    tie_embeddings: bool = True
    shared_copies: tuple[tuple[int, ...], ...] | None = None  # as ZambaConfig's (families/zamba2.py)

    LAYER_KINDS = LAYER_KINDS

    def __post_init__(self):
        self._freeze_layout()
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.n_mamba_heads % self.n_groups:
            raise ValueError(f"n_mamba_heads ({self.n_mamba_heads}) must be a multiple of n_groups ({self.n_groups})")
        if self.d_conv < 2:
            raise ValueError(f"Zamba2Config.d_conv must be >= 2, got {self.d_conv!r}")
        for name, value, allowed in (("act", self.act, tuple(ACTIVATIONS)), ("positions", self.positions, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"Zamba2Config.{name}={value!r}; expected one of {allowed}")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise ValueError(f"Zamba2Config.rope_scaling rope_type {kind!r}; expected one of {ROPE_TYPES}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")

    @property
    def d_inner(self) -> int:
        return self.n_mamba_heads * self.mamba_head_dim



def _layer(cfg: Zamba2Config, kind: str, block: int | None) -> HybridLayer:
    C, r = cfg.d_model, cfg.adapter_rank
    mixer = Mamba2Mixer(C, cfg.d_inner, cfg.d_state, cfg.n_mamba_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.d_conv,
                        chunk_size=cfg.chunk_size, conv_bias=True, proj_bias=cfg.proj_bias, norm_eps=ZAMBA2_GATED_NORM_EPS,
                        time_step_limit=(cfg.dt_limit_min, float("inf")))
    attn_adapter = mlp_adapter = None
    if kind == "hybrid":
        if cfg.attn_adapters:  # LoRA(2C -> q/k/v widths) on the normed [x | emb]
            widths = {"q": cfg.n_head * cfg.head_dim, "k": cfg.n_kv_head * cfg.head_dim, "v": cfg.n_kv_head * cfg.head_dim}
            attn_adapter = nn.ModuleDict({n: LoRA(2 * C, r, w) for n, w in widths.items()})
        mlp_adapter = LoRA(C, r, 2 * cfg.d_ffn)  # rows [gate | up]
    return HybridLayer(kind, block, C, cfg.norm_eps, mixer, attn_adapter, mlp_adapter)


class Zamba2(SharedBlockLM):
    def __init__(self, cfg: Zamba2Config):
        super().__init__()
        self.cfg = cfg
        C = cfg.d_model
        self.embed = embedding(cfg.vocab_size, C)
        self.layers = nn.ModuleList(_layer(cfg, k, b) for k, b in zip(cfg.layer_kinds, cfg.shared_blocks))
        self.shared = nn.ModuleList(SharedBlock(C, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ffn, cfg.act, cfg.norm_eps,
                                                mlp_bias=cfg.proj_bias) for _ in range(cfg.n_shared))
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if cfg.positions == "rope" else None
        self.final_norm = RMSNorm(C, eps=cfg.norm_eps)  # final_layernorm
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(C, cfg.vocab_size, bias=False)
        self._kv_row = {i: r for r, i in enumerate(cfg.hybrid_layers())}
        if not self.embed.weight.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random init after transformers' ``Zamba2PreTrainedModel._init_weights`` (initializer_range
        0.02): linears (adapters included) and embedding normal(0, std), biases 0, norms ones;
        each Mamba-2 mixer as ``Mamba2Mixer.reset_parameters`` with its in_proj drawn with ``std``."""
        mixers = [layer.mamba for layer in self.layers]
        mixer_parts = {id(m) for mixer in mixers for m in mixer.modules()}
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module) not in mixer_parts:
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        for mixer in mixers:
            mixer.reset_parameters(generator, init_std=std)

    def mixer_state(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """conv [Dc, W-1] (Dc = E + 2 G N: x, B and C go through the conv), ssm [Hm, Pm, N]."""
        cfg = self.cfg
        return ((cfg.d_inner + 2 * cfg.n_groups * cfg.d_state, cfg.d_conv - 1),
                (cfg.n_mamba_heads, cfg.mamba_head_dim, cfg.d_state))
