"""Mamba-2 in pure PyTorch: config -> SSD (state space duality) functions -> mixer -> block -> model.

Mirrors, block by block:
  * the paper: Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient
    Algorithms Through Structured State Space Duality" (sec. 6, the SSD algorithm: the
    chunked "block decomposition" of the semiseparable matrix; sec. 7 / fig. 6, the Mamba-2
    block with its single in_proj, multi-head scalar decay, B/C groups and gated norm);
  * the state-spaces reference code: ``mamba_ssm/modules/mamba2.py`` (``Mamba2.forward``
    split [z | xBC | dt] of ``in_proj``, conv over x|B|C, ``Mamba2.step``) and
    ``mamba_ssm/modules/ssd_minimal.py`` (``ssd_minimal_discrete``: intra-chunk products
    under the ``segsum`` decay mask, chunk states, the recurrence over chunk states, the
    state-to-output products);
  * transformers 5.24 ``models/mamba2/modeling_mamba2.py``: ``Mamba2Mixer.forward`` on its
    PyTorch path (``causal_conv1d_fn`` / ``causal_conv1d_update``, ``mamba2_chunk_scan`` for
    T > 1, ``mamba2_selective_state_update`` for one cached token), ``MambaRMSNormGated``
    (gate, then a group-wise RMS norm over d_inner / n_groups), ``Mamba2Block`` (pre-norm,
    ``residual_in_fp32``), ``Mamba2Model`` (``norm_f``) and ``Mamba2ForCausalLM``.

Dimension letters used in shape comments:

    B  batch
    T  time (sequence length)
    C  d_model      (residual stream, "hidden_size")
    E  d_inner      (mixer width, H * P, "expand * hidden_size")
    H  heads        ("num_heads"; one scalar decay per head)
    P  head_dim     ("head_dim" / mamba_ssm's "headdim")
    G  groups       ("n_groups" / "ngroups"; B and C are shared by the H/G heads of a group)
    R  heads per group, H // G
    N  d_state      ("state_size")
    W  d_conv       (causal conv width, "conv_kernel")
    Dc conv channels, E + 2 G N (x, B and C go through the conv)
    Q  chunk length of the whole-sequence SSD ("chunk_size"); k <= Q in the last chunk
    V  vocab
    L  layers

The SSM of one head h (group g = h // R), per token t, with scalar A_h = -exp(A_log_h):

    dt_t   = softplus(dt_raw_t + dt_bias)                                  [H]
    h_t    = exp(dt_t A) h_(t-1) + (dt_t x_t) (x) B_t                      [H, P, N]
    y_t    = h_t C_t + D x_t                                               [H, P]
    out_t  = out_proj(gated_rms_norm(y_t, z_t))

The whole-sequence form (SSD, ``ssd_chunked``) cuts time into chunks of Q tokens: inside a
chunk the outputs are the masked "attention-like" products (C B^T * decay mask) x, plus the
carried state read out with C; the chunk's inputs are folded into the state with one product.

Where the reference clamps dt (``time_step_limit``; default (0, inf) is no clamp): transformers'
chunked path (``mamba2_chunk_scan``, T > 1 or no cache) clamps dt after the softplus; its
recurrent step (``mamba2_selective_state_update``, one token with a cache) does not clamp at
all (nor does ``mamba_ssm``'s ``Mamba2.step`` / ``selective_state_update``). We do the same:
T > 1 clamps, T == 1 (the step) does not, so a finite limit that binds makes the step and the
whole-sequence path differ exactly where the reference's generate and forward differ. The
checks that compare our own two paths (verify's steps vs parallel, the ONNX step graph vs
PyTorch) run the whole sequence without the clamp (``CausalLM.parallel_as_step``) and say so.

Deviations from the references (numerical only; the same function is computed):
  * The whole-sequence path accepts an initial SSM state and the conv inputs of the previous
    call, so a prefill can be split into pieces (transformers does this only through its cache).
  * The whole-sequence path runs by segments of SSD_SEGMENT tokens, in_proj to out_proj,
    carrying the conv inputs and the SSM state from one segment to the next (transformers
    runs each step over the whole sequence): every temporary is sized by the segment, not
    by T. Inside a segment the chunked SSD computes all its chunks' products at once and
    hands the state from chunk to chunk (transformers: all chunks of the sequence at once,
    the chunk recurrence as a segment-sum product). The decay exponents sum(dt A) over
    (s, t] inside a chunk are differences of a float64 cumulative sum (transformers: a
    masked float32 cumsum), so no exp ever sees an unbounded sum and no difference of two
    large float32 sums loses the small ones; they are raised to EXP_FLOOR (exp ~ 1e-26)
    before the exp. The causal conv is one depthwise conv2d over the token-major inputs.
    Chosen by measurement (``bench/bench_mamba2.py``, ``bench/README.md``).
  * dt = softplus(dt_raw + dt_bias) is computed in float32 for every model dtype (transformers
    adds and applies the softplus in the model dtype), and so are the SSM output, D skip and
    the gated norm (transformers' step path rounds the scan output to the model dtype before
    the norm). For float32 models this changes nothing.
  * The convolution keeps the last W-1 inputs (transformers' cache keeps W).
  * The logits come out in the model dtype (transformers casts them to float32).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statecast.arch.layers import config_from_unified, rms_norm
from statecast.arch.mamba import Mamba, MambaBlock

# chunk_size: the checkpoints' own (mamba_ssm's and transformers' default; kept in the config
# for the round trip). SSD_CHUNK: the longest chunk our whole-sequence SSD uses, chosen by
# measurement (bench/bench_mamba2.py; mamba2-130m's shape, 2 threads): shorter chunks make
# smaller [Q, Q] decay masks and intra-chunk products, longer ones fewer, larger products. The
# chunk length changes only rounding, never the function; a model whose chunk_size is smaller
# runs with that (so small test models exercise several chunks).
CHUNK_SIZE = 256
SSD_CHUNK = 64
# SSD_SEGMENT: tokens per segment of the whole-sequence path (rounded down to whole chunks),
# which runs in_proj .. out_proj per segment: big enough for full-speed projections, small
# enough that no temporary grows with T (on CPU a fresh multi-MB buffer is page-faulted in
# again per 4 kB each time, see "Memory" in arch/mamba.py, and a [T, E] one falls out of
# cache between steps). Chosen by measurement (bench/README.md: 256, 512, 1024, 2048).
SSD_SEGMENT = 1024
# The SSD's decay exponents are raised to at least EXP_FLOOR before exp: exp(-60) ~ 9e-27 is
# below float32 (and float64 test) resolution of every term it scales, and torch's vectorized
# exp takes a slow path on inputs whose result underflows or on -inf (measured 4-40x slower
# than on [-60, 0]), which a decay mask of long chunks is full of.
EXP_FLOOR = -60.0


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Mamba2Config:
    vocab_size: int
    d_model: int
    n_layer: int
    n_heads: int  # H (HF num_heads)
    head_dim: int  # P
    d_state: int  # N (HF state_size)
    n_groups: int = 1  # G: B/C groups, H % G == 0
    d_conv: int = 4  # W (HF conv_kernel)
    chunk_size: int = CHUNK_SIZE  # Q of the whole-sequence SSD
    norm_eps: float = 1e-5  # block norms, final_norm and the gated norm (HF layer_norm_epsilon)
    proj_bias: bool = False  # in_proj / out_proj bias (HF use_bias)
    conv_bias: bool = True  # HF use_conv_bias
    norm_before_gate: bool = False  # gated norm: norm(y) * silu(z) if True, norm(y * silu(z)) if False
    dt_limit_min: float = 0.0  # time_step_limit[0]: dt clamped from below on the whole-sequence path
    dt_limit_max: float | None = None  # time_step_limit[1]; None: no upper bound (HF's inf)
    residual_in_fp32: bool = True
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.n_heads % self.n_groups:
            raise ValueError(f"Mamba2Config: n_heads ({self.n_heads}) must be a multiple of n_groups ({self.n_groups})")
        if self.d_conv < 2:
            raise ValueError(f"Mamba2Config.d_conv must be >= 2, got {self.d_conv!r}")
        if self.dt_limit_min < 0 or (self.dt_limit_max is not None and self.dt_limit_max < self.dt_limit_min):
            raise ValueError(f"Mamba2Config: dt limits must satisfy 0 <= min <= max, got "
                             f"{self.dt_limit_min!r}, {self.dt_limit_max!r}")

    @property
    def d_inner(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def time_step_limit(self) -> tuple[float, float]:
        return (self.dt_limit_min, math.inf if self.dt_limit_max is None else self.dt_limit_max)

    @classmethod
    def from_unified(cls, cfg: dict) -> "Mamba2Config":
        """Build from the unified config; other keys ("family", ...) are ignored."""
        return config_from_unified(cls, cfg, "mamba2")

    def to_unified(self) -> dict:
        return {**asdict(self), "layer_kinds": ["mamba2"] * self.n_layer}


class Mamba2State(NamedTuple):
    """Recurrent state, stacked over layers; returned anew by every call, never mutated."""

    conv: Tensor  # [L, B, Dc, W-1] model dtype: the last W-1 inputs of the causal conv over x|B|C (oldest first)
    ssm: Tensor  # [L, B, H, P, N] float32: h after the last token


# --------------------------------------------------------------------------- SSD
#
# x: [B, T, H, P]; dt: [B, T, H] (after softplus, and clamp on the whole-sequence path);
# A: [H] (= -exp(A_log) < 0); Bm, Cm: [B, T, G, N]; h: [B, H, P, N]. Every function returns
# y [B, T, H, P] (without the D skip) and the state after the last token [B, H, P, N], in the
# dtype of its inputs (float32 in the model; the tests use float64 as ground truth).


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h: Tensor):
    """One token of the SSM: transformers' ``mamba2_selective_state_update`` / ``Mamba2.step``.

    x [B, H, P] (or any shape holding it, e.g. [B, 1, H, P]); dt [B, H]; A [H]; Bm, Cm [B, G, N];
    h [B, H, P, N] -> y [B, H, P], new h [B, H, P, N]. Operands are reshaped, never indexed
    (one Reshape each in an exported graph); ``-1`` stands for B."""
    H, P, N = h.shape[1:]
    G = Bm.shape[-2]
    R = H // G
    dt = dt.reshape(-1, H, 1, 1)  # [B, H, 1, 1]
    dA = torch.exp(dt * A.reshape(H, 1, 1))  # [B, H, 1, 1] the head's scalar decay
    u = (dt * x.reshape(-1, H, P, 1)).reshape(-1, G, R, P, 1)  # [B, G, R, P, 1] dt x
    dBx = (u * Bm.reshape(-1, G, 1, 1, N)).reshape(-1, H, P, N)  # [B, H, P, N] (dt x) (x) B, B shared in a group
    h = torch.addcmul(dBx, h, dA)  # h dA + dBx
    y = torch.matmul(h.reshape(-1, G, R * P, N), Cm.reshape(-1, G, N, 1))  # [B, G, R*P, 1]
    return y.reshape(-1, H, P), h


def ssd_sequential(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h: Tensor):
    """Reference whole-sequence SSM: ``ssd_step`` over T (the recurrence verbatim)."""
    ys = []
    for t in range(x.shape[1]):
        y, h = ssd_step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], h)
        ys.append(y)
    return torch.stack(ys, 1), h


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h: Tensor, chunk: int | None = None):
    """Whole-sequence SSM by chunks of Q = ``chunk`` tokens (default SSD_CHUNK; SSD, Dao & Gu 2024 sec. 6;
    ``ssd_minimal_discrete``); same result as ``ssd_sequential`` up to rounding.

    Per chunk, with a_t = dt_t A (<= 0) and S(t, s) = a_(s+1) + ... + a_t (the decay exponent
    from token s to token t, 0 for t = s):
      * intra-chunk (the diagonal block): y_t += sum_(s <= t) (C_t . B_s) exp(S(t, s)) dt_s x_s:
        C B^T per group [k, k] times the decay mask per head, then a [k, k] x [k, P] product;
      * the carried state read out (off-diagonal blocks, "C terms"): y_t += exp(S(t, start)) C_t h;
      * the state after the chunk ("B terms" and the chunk recurrence):
        h <- exp(S(end, start)) h + sum_s exp(S(end, s)) (dt_s x_s) (x) B_s, one [R*P, k] x [k, N]
        product per group.
    S is a difference of a float64 cumulative sum over the chunk only: no exp of an unbounded
    sum, and no float32 cancellation between two large partial sums. Any T (the last chunk is
    shorter); the state goes in and comes out, so split prompts equal one whole prompt.

    Time is taken in segments of SSD_SEGMENT tokens (a whole number of chunks), all chunks of
    a segment at once (``_ssd_segment``): every temporary is sized by the segment, not by T.
    """
    Bsz, T, H, P = x.shape
    Q = min(chunk or SSD_CHUNK, T)
    S = _segment(Q)
    grad = _needs_grad(x, dt, A, Bm, Cm, h)
    if T <= S:
        return _ssd_segment(x, dt, A, Bm, Cm, h, Q, grad)
    y = x.new_empty(Bsz, T, H, P)
    for s0 in range(0, T, S):
        part = slice(s0, s0 + S)
        y[:, part], h = _ssd_segment(x[:, part], dt[:, part], A, Bm[:, part], Cm[:, part], h, Q, grad)
    return y, h


def _segment(Q: int) -> int:
    """Tokens per segment of the whole-sequence path: SSD_SEGMENT rounded down to whole chunks."""
    return max(Q, SSD_SEGMENT // Q * Q)


def _needs_grad(*tensors) -> bool:
    """Whether autograd records this call (then no out= and no in-place on saved tensors)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _ssd_segment(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h: Tensor, Q: int, grad: bool):
    """``ssd_chunked`` over one segment of L tokens: its whole chunks at once, then the partial
    one. Operands as ``ssd_chunked`` (any strides) -> y [B, L, H, P] contiguous, h."""
    L = x.shape[1]
    full = L // Q * Q
    if full in (0, L):
        return _ssd_chunks(x, dt, A, Bm, Cm, h, min(Q, L), grad)
    y0, h = _ssd_chunks(x[:, :full], dt[:, :full], A, Bm[:, :full], Cm[:, :full], h, Q, grad)
    y1, h = _ssd_chunks(x[:, full:], dt[:, full:], A, Bm[:, full:], Cm[:, full:], h, L - full, grad)
    return torch.cat([y0, y1], 1), h


def _ssd_chunks(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h: Tensor, Q: int, grad: bool):
    """The SSD of L = n Q tokens as n chunks of Q, computed together (batched products over the
    chunks), the state handed from chunk to chunk by n small multiply-adds.

    x [B, L, H, P], dt [B, L, H], Bm, Cm [B, L, G, N] (any strides), h [B, H, P, N]
    -> y [B, L, H, P] contiguous, the state after the last token. Without autograd the
    element-wise steps write into fresh buffers of the layout the next product wants (out=)
    and work in place; with it, the same steps out of place."""
    Bsz, L, H, P = x.shape
    G, N = Bm.shape[2], Bm.shape[3]
    R, n = H // G, L // Q
    dtype = x.dtype
    # decay exponents: a float64 cumsum within each chunk; S(t, s) = cum_t - cum_s
    a = (dt * A).view(Bsz, n, Q, H).transpose(2, 3)  # [B, n, H, Q] log decay per token
    cum = torch.cumsum(a.double(), -1)  # [B, n, H, Q] S(t, chunk start - 1)
    if grad:
        decay = (cum[..., :, None] - cum[..., None, :]).to(dtype).clamp(EXP_FLOOR, 0.0).exp()
    else:  # the float64 difference rounded straight into the float32 buffer, then in place
        seg = torch.sub(cum[..., :, None], cum[..., None, :], out=x.new_empty(Bsz, n, H, Q, Q))
        decay = seg.clamp_(EXP_FLOOR, 0.0).exp_()
    # decay [B, n, H, Q, Q]: exp S(t, s) below the diagonal, 1 above it (s > t, where S > 0
    # is clamped to 0: no overflow), zeroed there by the causal mask folded into C B^T
    # intra-chunk: (C B^T) per group, causally masked, times each head's decay, times dt x
    Bc = Bm.reshape(Bsz, n, Q, G, N).transpose(2, 3)  # [B, n, G, Q, N]
    Cc = Cm.reshape(Bsz, n, Q, G, N).transpose(2, 3)
    above = torch.ones(Q, Q, dtype=torch.bool, device=x.device).triu_(1)  # s > t: masked
    cb = torch.matmul(Cc, Bc.transpose(-1, -2)).masked_fill_(above, 0.0)[:, :, :, None]  # [B, n, G, 1, Q, Q]
    m = decay.view(Bsz, n, G, R, Q, Q)
    m = (m * cb if grad else m.mul_(cb)).view(Bsz, n, H, Q, Q)
    xv = x.reshape(Bsz, n, Q, H, P).transpose(2, 3)  # [B, n, H, Q, P] views
    dv = dt.reshape(Bsz, n, Q, H, 1).transpose(2, 3)
    u = (xv * dv).contiguous() if grad else torch.mul(xv, dv, out=x.new_empty(Bsz, n, H, Q, P))  # dt x
    y_in = torch.matmul(m, u)  # [B, n, H, Q, P]
    # each chunk's inputs decayed to its end and folded into a state: one product per group
    to_end = torch.exp((cum[..., -1:] - cum).to(dtype).clamp_min(EXP_FLOOR))  # [B, n, H, Q] exp S(end, s)
    uv = u.view(Bsz, n, G, R, Q, P).transpose(-1, -2)  # [B, n, G, R, P, Q]
    ev = to_end.view(Bsz, n, G, R, 1, Q)
    w = (uv * ev).reshape(Bsz, n, G, R * P, Q) if grad else torch.mul(uv, ev, out=x.new_empty(Bsz, n, G, R, P, Q))
    states = torch.matmul(w.view(Bsz, n, G, R * P, Q), Bc).view(Bsz, n, H, P, N)
    # the chunk recurrence: the state entering each chunk (exp of one chunk's sum, <= 0)
    dec = torch.exp(cum[..., -1].to(dtype).clamp_min(EXP_FLOOR))[..., None, None]  # [B, n, H, 1, 1]
    if grad:
        hs = []
        for j in range(n):
            hs.append(h)
            h = torch.addcmul(states[:, j], h, dec[:, j])
        h_in = torch.stack(hs, 1)
    else:
        h_in = x.new_empty(Bsz, n, H, P, N)
        h_in[:, 0] = h
        for j in range(n - 1):
            torch.addcmul(states[:, j], h_in[:, j], dec[:, j], out=h_in[:, j + 1])
        h = torch.addcmul(states[:, n - 1], h_in[:, n - 1], dec[:, n - 1])
    # the entering state read out by C, decayed to each token, plus the intra-chunk part
    y_st = torch.matmul(Cc, h_in.view(Bsz, n, G, R * P, N).transpose(-1, -2))  # [B, n, G, Q, R*P]
    ecum = torch.exp(cum.to(dtype).clamp_min(EXP_FLOOR))  # [B, n, H, Q] exp S(t, start)
    terms = (y_in.view(Bsz, n, G, R, Q, P).permute(0, 1, 4, 2, 3, 5),  # token-major [B, n, Q, G, R, P]
             y_st.view(Bsz, n, G, Q, R, P).permute(0, 1, 3, 2, 4, 5),
             ecum.view(Bsz, n, G, R, Q, 1).permute(0, 1, 4, 2, 3, 5))
    if grad:
        return torch.addcmul(*terms).reshape(Bsz, L, H, P), h
    return torch.addcmul(*terms, out=x.new_empty(Bsz, n, Q, G, R, P)).view(Bsz, L, H, P), h


# --------------------------------------------------------------------------- mixer


class GatedRMSNorm(nn.Module):
    """transformers' ``MambaRMSNormGated`` / mamba_ssm's ``RMSNormGated``: an RMS norm over
    groups of d_inner / n_groups channels with a learned scale, gated by silu(z): before the
    norm (``norm_before_gate=False``, what transformers always does) or after it. Float32."""

    def __init__(self, dim: int, groups: int, eps: float = 1e-5, norm_before_gate: bool = False):
        super().__init__()
        self.groups, self.eps, self.norm_before_gate = groups, eps, norm_before_gate
        self.weight = nn.Parameter(torch.empty(dim))
        if not self.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        # y [..., E] float32, z [..., E] -> [..., E] float32
        gate = F.silu(z.float())
        if not self.norm_before_gate:
            y = y * gate
        shape = y.shape
        y = rms_norm(y.reshape(*shape[:-1], self.groups, -1), None, self.eps).reshape(shape)
        y = y * self.weight.float()
        return y * gate if self.norm_before_gate else y


def _gated_norm_(norm: GatedRMSNorm, y: Tensor, z: Tensor) -> Tensor:
    """``norm(y, z)`` computed in y's own buffer (y float32, contiguous; no autograd): the
    mean square from one reduction (``vector_norm``) instead of a squared copy, then scales
    in place. Same function, rounding aside."""
    gate = F.silu(z.float())
    if not norm.norm_before_gate:
        y.mul_(gate)
    yg = y.view(*y.shape[:-1], norm.groups, -1)  # [..., G, E/G]
    ss = torch.linalg.vector_norm(yg, dim=-1, keepdim=True)  # [..., G, 1] sqrt(sum y^2)
    yg.mul_(ss.square_().div_(yg.shape[-1]).add_(norm.eps).rsqrt_())
    y.mul_(norm.weight.float())
    return y.mul_(gate) if norm.norm_before_gate else y


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer (Dao & Gu 2024 fig. 6; transformers ``Mamba2Mixer``; mamba_ssm
    ``Mamba2``): in_proj -> [z | x B C | dt] -> causal depthwise conv over x|B|C -> silu ->
    multi-head SSM (scalar decay per head, B/C per group) -> D skip -> gated RMS norm with z
    -> out_proj.

    Built from plain dimensions so that the hybrids (Zamba2, Bamba, Granite-4.0-H, Falcon-H1,
    Nemotron-H) compose it; tensor names are transformers' (``in_proj``, ``conv1d``,
    ``dt_bias``, ``A_log``, ``D``, ``norm.weight``, ``out_proj``).
    """

    def __init__(
        self,
        d_model: int,
        d_inner: int,
        d_state: int,
        n_heads: int,
        head_dim: int,
        n_groups: int,
        d_conv: int,
        *,
        chunk_size: int = CHUNK_SIZE,
        conv_bias: bool = True,
        proj_bias: bool = False,
        norm_eps: float = 1e-5,
        norm_before_gate: bool = False,
        time_step_limit: tuple[float, float] = (0.0, math.inf),
    ):
        super().__init__()
        if d_inner != n_heads * head_dim:
            raise ValueError(f"Mamba2Mixer: d_inner ({d_inner}) must be n_heads * head_dim ({n_heads} * {head_dim})")
        if n_heads % n_groups:
            raise ValueError(f"Mamba2Mixer: n_heads ({n_heads}) must be a multiple of n_groups ({n_groups})")
        C, E, N, H, G, W = d_model, d_inner, d_state, n_heads, n_groups, d_conv
        self.d_inner, self.d_state, self.n_heads, self.head_dim, self.n_groups, self.d_conv = E, N, H, head_dim, G, W
        self.conv_dim = E + 2 * G * N  # Dc
        self.chunk_size = chunk_size
        self.time_step_limit = tuple(float(v) for v in time_step_limit)
        lo, hi = self.time_step_limit
        # where this mixer's step and whole-sequence paths compute different functions (a dt
        # limit: the reference clamps on one path only), for CausalLM.parallel_as_step
        self.step_rule = (f"Mamba-2 dt limit [{lo:g}, {hi:g}] not applied (the reference's step does not clamp)"
                          if lo > 0.0 or hi != math.inf else None)
        self.parallel_as_step = False
        self.in_proj = nn.Linear(C, E + self.conv_dim + H, bias=proj_bias)  # -> [z | x B C | dt]
        # depthwise causal conv, HF's weight shape [Dc, 1, W]; the padding is unused (we carry state)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, W, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))  # A = -exp(A_log), one scalar per head
        self.D = nn.Parameter(torch.empty(H))
        self.norm = GatedRMSNorm(E, G, eps=norm_eps, norm_before_gate=norm_before_gate)
        self.out_proj = nn.Linear(E, C, bias=proj_bias)
        if not self.A_log.is_meta:
            self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: Mamba2Config) -> "Mamba2Mixer":
        return cls(cfg.d_model, cfg.d_inner, cfg.d_state, cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_conv,
                   chunk_size=cfg.chunk_size, conv_bias=cfg.conv_bias, proj_bias=cfg.proj_bias, norm_eps=cfg.norm_eps,
                   norm_before_gate=cfg.norm_before_gate, time_step_limit=cfg.time_step_limit)

    @torch.no_grad()
    def reset_parameters(
        self,
        generator: torch.Generator | None = None,
        init_std: float = 0.1,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_floor: float = 1e-4,
    ) -> None:
        """transformers' ``Mamba2PreTrainedModel._init_weights`` for one mixer (defaults of
        ``Mamba2Config``: initializer_range 0.1, time_step 1e-3..0.1, floor 1e-4): A_log =
        log(1..H), D = 1, dt_bias = softplus^-1 of a log-uniform dt, in_proj normal(0, std),
        kaiming-uniform conv and out_proj, zero biases, gated norm ones."""
        H = self.n_heads
        self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        u = torch.rand(H, generator=generator, dtype=torch.float32)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.in_proj.weight.normal_(0.0, init_std, generator=generator)
        nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5), generator=generator)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5), generator=generator)
        for bias in (self.in_proj.bias, self.conv1d.bias, self.out_proj.bias):
            if bias is not None:
                bias.zero_()
        self.norm.reset_parameters()

    def forward(self, x: Tensor, conv: Tensor, ssm: Tensor):
        """x [B, T, C] (normed residual stream), conv [B, Dc, W-1], ssm [B, H, P, N] float32
        -> out [B, T, C], new conv [B, Dc, W-1], new ssm [B, H, P, N]. T == 1 is the one-step
        recurrence (HF ``causal_conv1d_update`` + ``mamba2_selective_state_update``), T > 1
        the chunked SSD (HF ``causal_conv1d_fn`` + ``mamba2_chunk_scan``), both from the state."""
        if x.shape[1] > 1:
            return self._sequence(x, conv, ssm)
        E, N, H, P, G, Dc = self.d_inner, self.d_state, self.n_heads, self.head_dim, self.n_groups, self.conv_dim
        dtype = x.dtype
        zxbcdt = self.in_proj(x)  # [B, 1, E + Dc + H]
        z, xbc, dt = zxbcdt[..., :E], zxbcdt[..., E : E + Dc], zxbcdt[..., E + Dc :]  # strided views

        # 1. causal depthwise conv (HF causal_conv1d_update: one window), then silu
        w = self.conv1d.weight[:, 0].float()  # [Dc, W], tap W-1 = the current token
        bias = self.conv1d.bias
        window = torch.cat([conv, xbc.transpose(1, 2).to(conv.dtype)], dim=2)  # [B, Dc, W] oldest first
        acc = (window.float() * w).sum(-1)[:, None, :]  # [B, 1, Dc]
        if bias is not None:
            acc = acc + bias.float()
        new_conv = window[:, :, 1:]  # [B, Dc, W-1]
        xbc = F.silu(acc).to(dtype).float()  # HF rounds the conv output to the model dtype

        # 2. the SSM inputs: x per head, B and C per group, dt per head (float32)
        xs = xbc[..., :E].reshape(-1, 1, H, P)  # [B, 1, H, P]
        Bm = xbc[..., E : E + G * N].reshape(-1, 1, G, N)  # [B, 1, G, N]
        Cm = xbc[..., E + G * N :].reshape(-1, 1, G, N)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, 1, H]
        A = -torch.exp(self.A_log.float())  # [H]

        # 3. SSM and D skip: the step does not clamp dt (as HF)
        y, ssm = ssd_step(xs, dt, A, Bm, Cm, ssm.float())
        y = y.reshape(-1, 1, H, P) + xs * self.D.float()[:, None]  # [B, 1, H, P]

        # 4. gated RMS norm with z, out_proj
        y = self.norm(y.reshape(-1, 1, E), z)  # [B, 1, E] float32
        out = self.out_proj(y.to(dtype))  # [B, 1, C]
        # (a cast only when needed: the tracer records even a same-dtype .to() as a Cast node)
        return out, new_conv if new_conv.dtype == conv.dtype else new_conv.to(conv.dtype), ssm

    def _sequence(self, x: Tensor, conv: Tensor, ssm: Tensor):
        """The whole-sequence path (T > 1; HF ``causal_conv1d_fn`` + ``mamba2_chunk_scan``, started
        from the carried conv inputs and SSM state), ``forward``'s contract.

        Time is cut into segments of SSD_SEGMENT tokens (whole SSD chunks); each segment runs
        the whole mixer, in_proj to out_proj, with the conv inputs and the SSM state carried
        to the next. So every temporary is sized by the segment, not by T: on CPU a fresh
        multi-MB [B, T, *] buffer costs a page fault per 4 kB each time (see "Memory" in
        ``arch/mamba.py``), and a [B, T, E] one falls out of cache between the steps."""
        Bsz, T, _ = x.shape
        E, N, H, P, G, W = self.d_inner, self.d_state, self.n_heads, self.head_dim, self.n_groups, self.d_conv
        Dc, dtype = self.conv_dim, x.dtype
        Q = min(self.chunk_size, SSD_CHUNK)
        S = _segment(Q)
        grad = _needs_grad(x, conv, ssm, *self.parameters())
        w = self.conv1d.weight.float().view(Dc, 1, 1, W)  # depthwise, as a [1, W] 2-d kernel
        bias = None if self.conv1d.bias is None else self.conv1d.bias.float()
        dt_bias, D = self.dt_bias.float(), self.D.float()[:, None]
        A = -torch.exp(self.A_log.float())  # [H]
        lo, hi = self.time_step_limit
        # the whole-sequence path clamps dt (as HF; the step does not, nor does this path inside
        # CausalLM.parallel_as_step, where a self-consistency check compares the two)
        clamp = (lo > 0.0 or hi != math.inf) and not self.parallel_as_step
        prev = conv.transpose(1, 2)  # [B, W-1, Dc] the conv inputs before this segment, oldest first
        h = ssm.float()
        out = None if T <= S else x.new_empty(Bsz, T, self.out_proj.out_features)
        for s0 in range(0, T, S):
            k = min(S, T - s0)
            zxbcdt = self.in_proj(x[:, s0 : s0 + k])  # [B, k, E + Dc + H]
            z, xbc, dt = zxbcdt[..., :E], zxbcdt[..., E : E + Dc], zxbcdt[..., E + Dc :]  # strided views
            # 1. causal depthwise conv over [previous W-1 inputs | this segment] of x|B|C, then silu:
            # one conv2d over the token-major inputs seen as a channels-last [B, Dc, 1, W-1+k]
            # image (a single pass with the bias; 3x faster than a multiply-add per tap)
            window = torch.cat([prev, xbc], 1)  # [B, W-1+k, Dc]
            prev = window[:, k:]  # the last W-1 inputs, for the next segment and the state
            acc = F.conv2d(window.float().transpose(1, 2).unsqueeze(2), w, bias, groups=Dc)  # [B, Dc, 1, k]
            xc = F.silu(acc.squeeze(2).transpose(1, 2), inplace=not grad)  # [B, k, Dc]
            xc = xc.to(dtype).float().contiguous()  # HF rounds the conv output to the model dtype
            # 2. the SSM inputs: x per head, B and C per group (views), dt per head (float32)
            xs = xc[..., :E].view(Bsz, k, H, P)
            Bm = xc[..., E : E + G * N].view(Bsz, k, G, N)
            Cm = xc[..., E + G * N :].view(Bsz, k, G, N)
            dt = F.softplus(dt.float() + dt_bias)  # [B, k, H]
            if clamp:
                dt = dt.clamp(min=lo, max=hi)
            # 3. SSM and D skip
            y, h = _ssd_segment(xs, dt, A, Bm, Cm, h, Q, grad)  # [B, k, H, P] fresh
            # 4. gated RMS norm with z (in place in y without autograd), out_proj
            if grad:
                y = self.norm((y + xs * D).reshape(Bsz, k, E), z)
            else:
                y = _gated_norm_(self.norm, y.addcmul_(xs, D).view(Bsz, k, E), z)
            o = self.out_proj(y.to(dtype))  # [B, k, C]
            if out is None:
                out = o
            else:
                out[:, s0 : s0 + k] = o
        new_conv = prev.transpose(1, 2)  # [B, Dc, W-1]
        return out, new_conv if new_conv.dtype == conv.dtype else new_conv.to(conv.dtype), h


# --------------------------------------------------------------------------- block / model


class Mamba2Block(MambaBlock):
    """x + mixer(norm(x)), residual in float32 when ``residual_in_fp32`` (HF ``Mamba2Block``):
    Mamba-1's block around the Mamba-2 mixer."""

    mixer_class = Mamba2Mixer


class Mamba2(Mamba):
    """Mamba-1's model (embedding, blocks, ``norm_f``, tied or untied head; HF
    ``Mamba2ForCausalLM``, init as ``Mamba2PreTrainedModel._init_weights``) with Mamba-2 blocks
    and state. T > 1 runs the chunked SSD, T == 1 the one-step recurrence. No compiled kernels."""

    block_class = Mamba2Block
    state_type = Mamba2State

    def set_kernels(self, impl: str, **where) -> str:
        if impl not in ("auto", "torch"):
            raise ValueError(f"Mamba-2 has the pure-PyTorch path only, not {impl!r}")
        return "torch"

    def init_state(self, batch: int, device=None) -> Mamba2State:
        cfg = self.cfg
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype
        L, Dc = cfg.n_layer, cfg.d_inner + 2 * cfg.n_groups * cfg.d_state
        conv = torch.zeros(L, batch, Dc, cfg.d_conv - 1, dtype=dtype, device=device)
        ssm = torch.zeros(L, batch, cfg.n_heads, cfg.head_dim, cfg.d_state, dtype=torch.float32, device=device)
        return Mamba2State(conv, ssm)
