"""RWKV-4 in pure PyTorch: config -> WKV -> time mix / channel mix -> block -> model.

Mirrors, block by block:
  * the paper: Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era"
    (sec. "Architecture": token shift (the mu lerps), time mixing with the WKV
    operator, channel mixing; the RNN form of WKV as "inference" recurrence);
  * transformers' ``models/rwkv/modeling_rwkv.py`` (``RwkvForCausalLM`` with
    ``rescale_every=0``): same blocks, same pre-LN on layer 0, same state semantics,
    and ``rwkv_linear_attention_cpu`` for the numerically stable WKV recurrence;
  * BlinkDL's ``rwkv`` package (``rwkv/model.py``): ``att_one``/``ffn_one`` are the
    one-token RNN form (our ``Rwkv.step``), ``att_seq``/``ffn_seq`` the sequence form.

Dimension letters used in shape comments:

    B  batch
    T  time (sequence length)
    C  d_model      (residual stream, "hidden_size")
    A  d_attn       (time-mix width, "attention_hidden_size")
    F  d_ffn        (channel-mix width, "intermediate_size")
    V  vocab
    L  layers
    K  chunk length of the whole-sequence WKV
    N  number of chunks, ceil(T / K)

Deviations from the references (all numerical-only; same function computed):
  * The whole-sequence WKV is chunked (``wkv_chunked``) instead of a Python loop over
    T: within a chunk the recurrence is a per-channel lower-triangular Toeplitz matrix
    (constant decay per channel), applied with float64 ``bmm``s; chunks are chained by a
    short loop over N. Its final state is returned normalised, ``num = S/Z, den = 1,
    max = log Z``: a different (num, den, max) triple than the sequential recurrence
    leaves, representing the same S = num*exp(max), Z = den*exp(max). The single-token
    path (``wkv_step``) is the reference recurrence verbatim.
  * The time-mix projections are computed as ``W @ x^T`` so that k, v, r come out
    channel-major ([A, B*T] in memory, presented as [B, T, A] views): that is the
    layout the chunked WKV wants, and it saves transposing copies. Same products.
  * ``x*mu + sx*(1-mu)`` is computed as ``sx + mu*(x - sx)`` (one fused addcmul).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statecast.arch.layers import CausalLM, config_from_unified, embedding, every_layer, is_exporting, stack_layers, token_shift

WKV_CHUNK = 16  # K; chosen by measurement (see wkv_chunked)
# Tokens per pass through the layers in Rwkv.forward (None: all at once). Bounds the
# activation memory of long prompts, and keeps glibc from handing the large temporaries
# back to the OS between layers: on the 169M shape at T=2048 (2 threads) one pass took
# 1.35x the GEMM floor with 280k page faults, 512-token segments 1.19x with 100k (the
# logits' own); 256: 1.24x, 1024: 1.21x.
PREFILL_SEGMENT = 512
_MAX_INIT = -1e38  # initial running log-scale, as rwkv_linear_attention_cpu


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RwkvConfig:
    vocab_size: int
    d_model: int
    n_layer: int
    d_attn: int
    d_ffn: int
    norm_eps: float = 1e-5  # block norms (embed_norm, mixer_norm, mlp_norm)
    final_norm_eps: float = 1e-5  # final_norm (HF's ln_out never takes the config eps)
    tie_embeddings: bool = False

    @classmethod
    def from_unified(cls, cfg: dict) -> "RwkvConfig":
        """Build from the unified config; other keys ("family", ...) are ignored."""
        if cfg.get("version", 4) != 4:
            raise ValueError(f"only RWKV-4 is supported, got version {cfg['version']!r}")
        return config_from_unified(cls, cfg, "rwkv")

    def to_unified(self) -> dict:
        return {**asdict(self), "layer_kinds": ["rwkv"] * self.n_layer, "version": 4}


class RwkvState(NamedTuple):
    """Recurrent state, stacked over layers; returned anew by every call, never mutated."""

    ffn_x: Tensor  # [L, B, C] last normed input of channel mix (model dtype)
    att_x: Tensor  # [L, B, C] last normed input of time mix (model dtype)
    att_num: Tensor  # [L, B, A] float32, sum of e^k v, scaled by exp(-att_max)
    att_den: Tensor  # [L, B, A] float32, sum of e^k,   scaled by exp(-att_max)
    att_max: Tensor  # [L, B, A] float32, running log-scale (initially -1e38)


# --------------------------------------------------------------------------- WKV
#
# Per channel, with w = exp(decay) > 0 and u = bonus (the paper's WKV operator in RNN
# form; HF's rwkv_linear_attention_cpu):
#     wkv_t   = (S_t + e^(u+k_t) v_t) / (Z_t + e^(u+k_t))
#     S_(t+1) = e^-w S_t + e^k_t v_t,      Z_(t+1) = e^-w Z_t + e^k_t
# The state is carried as (num, den, max) = (S, Z) * exp(-max).


def wkv_step(w: Tensor, u: Tensor, k: Tensor, v: Tensor, num: Tensor, den: Tensor, mx: Tensor):
    """One token of the WKV recurrence, stabilised by the running max.

    Exactly ``rwkv_linear_attention_cpu``'s loop body (= BlinkDL's ``att_one``).
    w, u: [A] float32 (w = exp(decay)); k, v, num, den, mx: [B, A] float32.
    Returns wkv [B, A] and the new (num, den, mx).
    """
    uk = u + k  # [B, A]
    p = torch.maximum(mx, uk)
    e1 = torch.exp(mx - p)
    e2 = torch.exp(uk - p)
    wkv = (e1 * num + e2 * v) / (e1 * den + e2)
    mw = mx - w  # decayed log-scale
    p = torch.maximum(mw, k)
    e1 = torch.exp(mw - p)
    e2 = torch.exp(k - p)
    return wkv, e1 * num + e2 * v, e1 * den + e2, p


def wkv_sequential(w: Tensor, u: Tensor, k: Tensor, v: Tensor, num: Tensor, den: Tensor, mx: Tensor):
    """Reference whole-sequence WKV: ``wkv_step`` over T (k, v: [B, T, A]).

    Runs in the dtype of its inputs (tests use float64 as ground truth).
    """
    out = torch.empty_like(v)  # [B, T, A]
    for t in range(k.shape[1]):
        out[:, t], num, den, mx = wkv_step(w, u, k[:, t], v[:, t], num, den, mx)
    return out, num, den, mx


def _chunk_matrix(w: Tensor, u: Tensor, K: int) -> Tensor:
    """Per-channel intra-chunk transfer matrix, transposed: Dt[a, i, j] = D[a, j, i].

    D[j, i] = e^(-(j-1-i) w) for i < j,  e^u for i == j,  0 for i > j  (rows j < K:
    the contribution of token i to position j's wkv numerator/denominator); row j == K
    is e^(-(K-1-i) w), token i's contribution to the state after the chunk.
    D is Toeplitz (depends on j - i only), so it is a sliding window over one row
    s[n] = D at (j - i = n - (K-1)): ``unfold`` gives the window view, ``flip`` makes it
    a plain [A, K, K+1] tensor. float64: entries far below 1 must not flush to zero.
    """
    A = w.shape[0]
    d = torch.arange(K, dtype=torch.float64, device=w.device)  # [K] distances 0..K-1
    s = torch.cat(
        [
            torch.zeros(A, K - 1, dtype=torch.float64, device=w.device),  # j < i
            torch.exp(u.double())[:, None],  # j == i: the bonus
            torch.exp(-d * w.double()[:, None]),  # j - i = 1 + d: decay^d
        ],
        dim=1,
    )  # [A, 2K]
    return s.unfold(1, K + 1, 1).flip(1)  # [A, K, K+1]


def wkv_chunked(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, num: Tensor, den: Tensor, mx: Tensor, chunk: int = WKV_CHUNK
):
    """Whole-sequence WKV, chunked; same result as ``wkv_sequential`` (to float32 rounding).

    w, u: [A] (w = exp(decay) > 0); k, v: [B, T, A] (channel-major memory is cheapest);
    num, den, mx: [B, A] float32. Returns wkv [B, T, A] float32 (a channel-major view)
    and the state after the last token, renormalised to (S/Z, 1, ref + log Z).

    Algorithm (K = chunk; T is padded at the FRONT to N*K with tokens of weight e^k = 0,
    so the final state lands exactly on position T):
      1. one log-scale per (channel, sequence): ref = max(max_t k, incoming log-weight);
         the weights e^(k-ref) in float64, whose exponent range keeps a token far below
         the max (k - ref down to ~ -700) from underflowing into 0/0;
      2. two bmms (e^(k-ref) v and e^(k-ref)) with the Toeplitz matrix (``_chunk_matrix``):
         the intra-chunk numerator/denominator of every position and each chunk's total;
      3. a loop over N carries the state across chunks, S_(n+1) = e^(-K w) S_n + total_n
         (one addcmul on [A, 2, B] per chunk); the incoming state enters at position `pad`;
      4. every position adds its chunk's incoming state decayed by j steps, then divides.
    Exact (to float64 rounding) while the spread of k within one call stays below ~700;
    RWKV keys are O(10), the tests use +-60 with decays exp(w) from 1e-3 to 30.

    Measured with bench/bench_prefill.py (A=768, B=1, 2 threads, best of 10; ranges over
    three runs on a shared 2-core machine): per layer at T=1024, K=16 5.9-6.4 ms, K=32
    7.4-8.0 ms, K=64 11.9-13.5 ms, the float32 loop over T (``wkv_sequential``, the
    algorithm transformers runs on CPU) 59-97 ms; at T=2048 11.5-13.2 / 13.1-14.7 /
    18.9-21.0 / 145-171 ms. So the WKV is ~4% of the 169M forward (~0.08 s of ~1.8 s
    at T=1024, GEMMs ~1.5 s) instead of ~40%. Small K wins: the [A, K, K+1] matrix stays
    in cache and the bmm flops grow with K, while the carry loop costs one small op per chunk.
    One bmm over concatenated [v-weighted; plain] weights was ~15% slower than two bmms
    (the concatenation copy), and a variant with per-chunk maxima and a log-domain carry
    (weighted means merged by sigmoid gates) was slower and 10x less accurate.
    """
    B, T, A = k.shape
    K = chunk
    N = -(-T // K)
    pad = N * K - T
    f64 = torch.float64
    w64 = w.double()

    kc = k.float().permute(2, 0, 1).contiguous()  # [A, B, T] (no copy for channel-major k)
    vc = v.float().permute(2, 0, 1).contiguous()
    if pad:
        kc = F.pad(kc, (pad, 0), value=-math.inf)  # e^-inf = 0: padding adds nothing
        vc = F.pad(vc, (pad, 0))

    # 1. shared log-scale, float64 weights
    l_in = (mx + torch.log(den)).T  # [A, B] incoming log-weight (-inf for an empty state)
    ref = torch.maximum(kc.amax(-1), l_in)  # [A, B]
    ek = kc.to(f64).sub_(ref[..., None]).exp_()  # [A, B, NK]

    # 2. intra-chunk sums for every position (rows 0..K-1) and the chunk total (row K)
    D = _chunk_matrix(w, u, K)  # [A, K, K+1]
    Y_den = torch.bmm(ek.view(A, B * N, K), D).view(A, B, N, K + 1)
    Y_num = torch.bmm((ek * vc).view(A, B * N, K), D).view(A, B, N, K + 1)
    del ek, kc, vc  # free early: a lower heap peak means fewer pages returned to the OS and refaulted

    # 3. carry (S, Z) / e^ref across chunks; chunk 0 decays the incoming state by K - pad
    #    steps only (pre-scaling it by e^(pad w) instead would overflow for large w)
    scale = torch.exp((mx.T - ref).to(f64))  # [A, B]
    S = torch.stack([num.T * scale, den.T * scale], dim=1)  # [A, 2, B]
    total = torch.stack([Y_num[..., K], Y_den[..., K]], dim=1)  # [A, 2, B, N]
    decay_K = torch.exp(-K * w64)[:, None, None]  # [A, 1, 1]
    carried = []
    for n in range(N):
        carried.append(S)
        S = torch.addcmul(total[..., n], S, torch.exp(-(K - pad) * w64)[:, None, None] if n == 0 else decay_K)
    S_in = torch.stack(carried, dim=3).unsqueeze(-1)  # [A, 2, B, N, 1] state entering each chunk

    # 4. add the incoming state decayed by j steps (chunk 0: j - pad), in place on the bmm
    #    outputs (bmm's backward does not need them), then divide
    steps = torch.arange(K, dtype=f64, device=w.device)  # [K]
    decay_j = torch.exp(-steps * w64[:, None])[:, None, None]  # [A, 1, 1, K]
    decay_0 = torch.exp(-(steps - pad).clamp(min=0) * w64[:, None])[:, None]  # [A, 1, K]
    for i, Y in enumerate((Y_num, Y_den)):
        Y[:, :, 1:, :K].addcmul_(S_in[:, i, :, 1:], decay_j)
        Y[:, :, 0, :K].addcmul_(S_in[:, i, :, 0], decay_0)
    Y_den[:, :, 0, :pad] = 1.0  # padding positions (dropped below) must not divide 0/0
    out = (Y_num[..., :K] / Y_den[..., :K]).view(A, B, N * K)[:, :, pad:].float()  # [A, B, T]

    S_num, S_den = S[:, 0], S[:, 1]  # [A, B] final state / e^ref
    new_num = (S_num / S_den).float().T  # [B, A]
    new_max = (ref + torch.log(S_den)).float().T
    return out.permute(1, 2, 0), new_num, torch.ones_like(new_num), new_max


# --------------------------------------------------------------------------- blocks


def _linear_cm(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T computed as weight @ x^T: [B, T, C] -> [B, T, A] view of [A, B*T] memory.

    Exported graphs take the plain ``F.linear`` (MatMul by a constant right operand, which
    dynamic quantization recognises; the layout trick only matters to the chunked WKV)."""
    if is_exporting():
        return F.linear(x, weight)  # [B, T, A]
    B, T, C = x.shape
    return torch.mm(weight, x.reshape(B * T, C).T).T.view(B, T, -1)


def _mix(sx: Tensor, dx: Tensor, mu: Tensor) -> Tensor:
    """The token-shift lerp ``sx + mu * dx`` ([B, T, C]): one fused addcmul eagerly, the plain
    form when exporting (the TorchScript exporter's addcmul promotes float16 to float32)."""
    return sx + dx * mu if is_exporting() else torch.addcmul(sx, dx, mu)


class TimeMix(nn.Module):
    """RWKV-4 time mixing (paper: time-mixing block; HF ``RwkvSelfAttention``; BlinkDL ``att_one``/``att_seq``)."""

    def __init__(self, cfg: RwkvConfig):
        super().__init__()
        C, A = cfg.d_model, cfg.d_attn
        self.decay = nn.Parameter(torch.empty(A))  # raw w; per-step decay factor exp(-exp(w))
        self.bonus = nn.Parameter(torch.empty(A))  # u, weight of the current token
        self.mix_k = nn.Parameter(torch.empty(C))
        self.mix_v = nn.Parameter(torch.empty(C))
        self.mix_r = nn.Parameter(torch.empty(C))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)

    def forward(self, x: Tensor, sx: Tensor, num: Tensor, den: Tensor, mx: Tensor):
        # x, sx: [B, T, C] normed input and its token shift; num, den, mx: [B, A] float32
        dx = x - sx
        k = _linear_cm(_mix(sx, dx, self.mix_k), self.key.weight)  # [B, T, A]
        v = _linear_cm(_mix(sx, dx, self.mix_v), self.value.weight)  # [B, T, A]
        r = torch.sigmoid(_linear_cm(_mix(sx, dx, self.mix_r), self.receptance.weight))
        w = torch.exp(self.decay.float())  # [A]
        u = self.bonus.float()  # [A]
        if x.shape[1] == 1:  # RNN form: one token
            wkv, num, den, mx = wkv_step(w, u, k[:, 0].float(), v[:, 0].float(), num, den, mx)
            wkv = wkv.unsqueeze(1)  # [B, 1, A]
        else:
            wkv, num, den, mx = wkv_chunked(w, u, k, v, num, den, mx, WKV_CHUNK)
        out = torch.matmul(r * wkv.to(r.dtype), self.output.weight.T)  # [B, T, C]
        return out, num, den, mx


class ChannelMix(nn.Module):
    """RWKV-4 channel mixing (paper: channel-mixing block; HF ``RwkvFeedForward``; BlinkDL ``ffn_one``/``ffn_seq``)."""

    def __init__(self, cfg: RwkvConfig):
        super().__init__()
        C, Fd = cfg.d_model, cfg.d_ffn
        self.mix_k = nn.Parameter(torch.empty(C))
        self.mix_r = nn.Parameter(torch.empty(C))
        self.up = nn.Linear(C, Fd, bias=False)  # "key"
        self.down = nn.Linear(Fd, C, bias=False)  # "value"
        self.receptance = nn.Linear(C, C, bias=False)

    def forward(self, x: Tensor, sx: Tensor) -> Tensor:
        # x, sx: [B, T, C]
        dx = x - sx
        k = torch.relu_(self.up(_mix(sx, dx, self.mix_k)))  # [B, T, F], relu in place
        # squared ReLU; in place unless autograd needs k: a fresh [T, F] buffer costs ~3 ms
        # of page faults per layer at T=1024 (measured), as much as the relu and mul together
        k = k * k if torch.is_grad_enabled() else k.mul_(k)
        r = torch.sigmoid(self.receptance(_mix(sx, dx, self.mix_r)))  # [B, T, C]
        return r * self.down(k)  # [B, T, C]


class RwkvBlock(nn.Module):
    """x + time_mix(ln1(x)), then + channel_mix(ln2(x)) (HF ``RwkvBlock`` without pre_ln)."""

    def __init__(self, cfg: RwkvConfig):
        super().__init__()
        self.mixer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.time_mix = TimeMix(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = ChannelMix(cfg)

    def forward(self, x: Tensor, ffn_x: Tensor, att_x: Tensor, num: Tensor, den: Tensor, mx: Tensor):
        # x: [B, T, C]; ffn_x, att_x: [B, C]; num, den, mx: [B, A]
        h = self.mixer_norm(x)
        att, num, den, mx = self.time_mix(h, token_shift(h, att_x), num, den, mx)
        x = x + att
        h2 = self.mlp_norm(x)
        x = x + self.mlp(h2, token_shift(h2, ffn_x))
        return x, (h2[:, -1], h[:, -1], num, den, mx)  # layer state in RwkvState order


# --------------------------------------------------------------------------- model


class Rwkv(CausalLM):
    def __init__(self, cfg: RwkvConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = embedding(cfg.vocab_size, cfg.d_model)
        self.embed_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)  # HF pre_ln / native ln0
        self.layers = nn.ModuleList(RwkvBlock(cfg) for _ in range(cfg.n_layer))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.final_norm_eps)  # ln_out
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if not self.embed.weight.is_meta:  # a meta model (shapes only) needs no init
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random init after transformers' ``RwkvPreTrainedModel._init_weights`` (= RWKV-LM).

        Deterministic schedules for decay / bonus / token-shift mixes; linears are normal
        with std gain/sqrt(fan_in), which has the scale of HF's orthogonal init (gain 0.5
        for the head) without a QR of the [V, C] head; embedding normal(0, 1e-4).
        Deviation: bonus = log(0.3) + zigzag as in RWKV-LM; HF's ``ones_like(...)`` makes it 1.
        """
        cfg = self.cfg
        L, C, A = cfg.n_layer, cfg.d_model, cfg.d_attn
        ramp = torch.arange(C, dtype=torch.float64) / C  # [C] 0 .. (C-1)/C
        h = torch.arange(A, dtype=torch.float64)
        zigzag = 0.5 * (((h + 1) % 3) - 1)  # [A] 0.5, -0.5, 0, ...
        for i, layer in enumerate(self.layers):
            r01 = i / max(L - 1, 1)  # 0 -> 1 over depth
            r10 = 1.0 - i / L  # 1 -> ~0 over depth
            tm, cm = layer.time_mix, layer.mlp
            tm.decay.copy_(-5 + 8 * (h / max(A - 1, 1)) ** (0.7 + 1.3 * r01))
            tm.bonus.copy_(math.log(0.3) + zigzag)
            tm.mix_k.copy_(ramp**r10)
            tm.mix_v.copy_(ramp**r10 + 0.3 * r01)
            tm.mix_r.copy_(ramp ** (0.5 * r10))
            cm.mix_k.copy_(ramp**r10)
            cm.mix_r.copy_(ramp**r10)
            for norm in (layer.mixer_norm, layer.mlp_norm):
                norm.reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                gain = 0.5 if module is self.lm_head else 1.0
                module.weight.normal_(0.0, gain / math.sqrt(module.in_features), generator=generator)
        self.embed.weight.normal_(0.0, 1e-4, generator=generator)
        self.embed_norm.reset_parameters()
        self.final_norm.reset_parameters()

    def state_layers(self) -> dict[str, tuple[int, ...]]:
        return every_layer(RwkvState._fields, self.cfg.n_layer)

    def init_state(self, batch: int, device=None) -> RwkvState:
        cfg = self.cfg
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype
        L, C, A = cfg.n_layer, cfg.d_model, cfg.d_attn
        zx = torch.zeros(L, batch, C, dtype=dtype, device=device)
        z = torch.zeros(L, batch, A, dtype=torch.float32, device=device)
        return RwkvState(zx, zx.clone(), z, z.clone(), torch.full_like(z, _MAX_INIT))

    def forward(self, input_ids: Tensor, state: RwkvState | None = None, *, output_hidden: bool = False):
        """input_ids [B, T] -> logits [B, T, V], new state (+ per-layer residual streams).

        T > 1 runs the whole-sequence path (``wkv_chunked``), T == 1 the RNN step
        (``wkv_step``); everything else is shared. ``state`` None means an empty history.
        Long inputs go through the layers in segments of PREFILL_SEGMENT tokens, carrying
        the state (chunked prefill; same result), then through one head GEMM.
        """
        if state is None:
            state = self.init_state(input_ids.shape[0], input_ids.device)
        x = self.embed_norm(self.embed_tokens(input_ids))  # [B, T, C]
        seg = PREFILL_SEGMENT or x.shape[1]
        outs, hidden = [], [[] for _ in self.layers]
        for s in range(0, x.shape[1], seg):
            y, state = self._layers(x[:, s : s + seg], state, hidden if output_hidden else None)
            outs.append(y)
        x = self.final_norm(outs[0] if len(outs) == 1 else torch.cat(outs, 1))
        logits = self.head_logits(x)  # [B, T, V]
        if output_hidden:
            return logits, state, [h[0] if len(h) == 1 else torch.cat(h, 1) for h in hidden]
        return logits, state

    def _layers(self, x: Tensor, state: RwkvState, hidden: list[list[Tensor]] | None):
        # x: [B, T, C] embedded input -> residual stream after the last block, new state
        new = ([], [], [], [], [])  # per RwkvState field, one entry per layer
        for i, layer in enumerate(self.layers):
            x, layer_state = layer(x, *(s[i] for s in state))
            for acc, s in zip(new, layer_state):
                acc.append(s)
            if hidden is not None:
                hidden[i].append(x)
        return x, RwkvState(*(stack_layers(acc) for acc in new))
