"""Mamba-1 in pure PyTorch: config -> selective scan -> mixer -> block -> model.

Mirrors, block by block:
  * the paper: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
    Spaces" (Algorithm 2, the selective SSM; sec. 3.4 / fig. 3, the Mamba block);
  * transformers 5.24 ``models/mamba/modeling_mamba.py``: ``MambaMixer.forward`` on its
    PyTorch path (``causal_conv1d_fn`` / ``causal_conv1d_update`` for the convolution,
    ``mamba_selective_scan``'s recurrent loop for T > 1, ``mamba_selective_state_update``
    for one token), ``MambaBlock`` (pre-norm, ``residual_in_fp32``), ``MambaModel``
    (``norm_f``) and ``MambaForCausalLM`` (head tied to the embedding by default);
  * ``models/falcon_mamba/modeling_falcon_mamba.py``: ``FalconMambaMixer`` normalises
    dt, B and C (RMS, no learned scale, eps ``mixer_rms_eps``) right after ``x_proj``
    (``bcdt_norm="rms"``);
  * ``models/jamba/modeling_jamba.py``: ``JambaMambaMixer`` does the same with learned
    scales (``dt_layernorm``/``b_layernorm``/``c_layernorm``; ``bcdt_norm="rms_weighted"``),
    and has ``mamba_proj_bias`` / ``mamba_conv_bias`` flags. Jamba reuses ``MambaMixer``.

Dimension letters used in shape comments:

    B  batch
    T  time (sequence length)
    C  d_model      (residual stream, "hidden_size")
    E  d_inner      (mixer width, "intermediate_size")
    N  d_state      ("state_size")
    R  dt_rank      ("time_step_rank")
    W  d_conv       (causal conv width, "conv_kernel")
    V  vocab
    L  layers
    K  scan segment length (tokens per pass of ``selective_scan``)

The selective SSM, per channel e and state index n (ZOH for A, Euler for B, as in
the paper and every reference implementation):

    dt_t   = softplus(dt_proj(x_proj(x_t)[:R]) )                 [E]
    h_t    = exp(dt_t A) * h_(t-1) + (dt_t x_t) B_t              [E, N], A = -exp(A_log)
    y_t    = h_t C_t + D x_t                                      [E]
    out_t  = out_proj(y_t * silu(z_t))

Deviations from the references (numerical only; the same function is computed):
  * The whole-sequence scan (``selective_scan``) runs the reference recurrence in
    segments of K tokens with the state laid out [B, N, E] (E innermost), one fused
    ``addcmul`` per token on preallocated buffers, and ``exp2(dt * A log2 e)`` instead
    of ``exp(dt * A)`` (exp2 is ~2.7x faster than exp on CPU; rounding differs by a few
    ulp). transformers materialises [B, E, T, N] for the whole sequence and does a
    matvec per token. Chosen by measurement among several algorithms: see
    ``bench/bench_scan.py`` and ``bench/README.md``.
  * The whole-sequence path accepts an initial SSM state (transformers' PyTorch and
    kernel paths start from zeros for T > 1), so a prefill can be split into pieces.
  * The convolution keeps the last W-1 inputs (transformers' cache keeps W) and is
    computed as W shifted multiply-adds in float32 on the [B, T, E] layout the GEMMs
    produce, instead of ``F.conv1d`` on a transposed copy; same sums.
  * The scan output y, the D skip and the silu gate are float32 for every model dtype
    (transformers computes y = h C in the model dtype); the SSM state is float32 as in
    transformers' cache. For float32 models this changes nothing.
  * The logits come out in the model dtype (transformers casts them to float32), as in
    the other statecast families.

Compiled path (``scan_impl="compiled"``, set through ``Mamba.set_kernels`` or
``MambaMixer.scan_impl``): two small C++ CPU kernels in ``kernels/mamba_scan.cpp``, built
with the local compiler by ``torch.utils.cpp_extension.load`` (once; torch caches the build
on disk for later processes): the selective scan fused with the D skip and the silu gate
(one loop over T per block of 16 channels, vectorised over channels, polynomial exp2), and
the causal conv fused with its silu. Used only for float32, T > 1, when autograd does not
record. A model built here runs the pure path; ``Mamba.set_kernels("auto")`` (what
``load_model``, ``verify``, ``generate`` and the CLI do by default) picks the compiled
kernels for a float32 CPU model when they build and pass a self-check against the pure
path on a small random input (:func:`compiled_scan_status`, once per process), and the
pure path otherwise, saying why. The pure path is the reference, always there, and what
export traces.

Memory: on CPU every fresh [B, T, E] temporary of a layer is returned to the OS by the
allocator and page-faulted in again by the next layer (measured: ~1 ms per 6 MB buffer at
T=1024, as much as the op that fills it), so the whole-sequence path works in place where
autograd allows it and sizes the scan's buffers by K, not T.
"""

from __future__ import annotations

import hashlib
import math
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statecast.arch.layers import (
    CausalLM,
    HeadLinear,
    RMSNorm,
    config_from_unified,
    embedding,
    every_layer,
    is_exporting,
    per_head_linear,
    rms_norm,
    stack_layers,
)

BCDT_NORMS = ("none", "rms", "rms_weighted")
SCAN_IMPLS = ("torch", "compiled")
# K, tokens per segment of the whole-sequence scan: the two [B, K, N, E] buffers stay in
# cache (K=32: 2 x 3 MB at E=1536, N=16). Measured per layer at T=1024 (bench/bench_scan.py,
# 2 threads): K=8 18.4 ms, 16 15.4, 32 13.9, 64 16.9; at T=2048 K=32 and 64 tie (27 ms).
SCAN_SEGMENT = 32
_LOG2E = 1.0 / math.log(2.0)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class MambaConfig:
    vocab_size: int
    d_model: int
    n_layer: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int
    norm_eps: float = 1e-5  # block norms and final_norm (HF layer_norm_epsilon)
    proj_bias: bool = False  # in_proj / out_proj bias (HF use_bias)
    conv_bias: bool = True  # HF use_conv_bias
    bcdt_norm: str = "none"  # "none" (Mamba) | "rms" (Falcon Mamba) | "rms_weighted" (Jamba)
    bcdt_norm_eps: float = 1e-6  # eps of the dt/B/C norms (Falcon mixer_rms_eps)
    residual_in_fp32: bool = True
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layer", "d_inner", "d_state", "dt_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.d_conv, int) or self.d_conv < 2:
            raise ValueError(f"MambaConfig.d_conv must be an integer >= 2, got {self.d_conv!r}")
        if self.bcdt_norm not in BCDT_NORMS:
            raise ValueError(f"MambaConfig.bcdt_norm must be one of {BCDT_NORMS}, got {self.bcdt_norm!r}")
        for name in ("norm_eps", "bcdt_norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MambaConfig.{name} must be > 0, got {getattr(self, name)!r}")

    @classmethod
    def from_unified(cls, cfg: dict) -> "MambaConfig":
        """Build from the unified config; other keys ("family", ...) are ignored."""
        return config_from_unified(cls, cfg, "mamba")

    def to_unified(self) -> dict:
        return {**asdict(self), "layer_kinds": ["mamba"] * self.n_layer}


class MambaState(NamedTuple):
    """Recurrent state, stacked over layers; returned anew by every call, never mutated."""

    conv: Tensor  # [L, B, E, W-1] model dtype: the last W-1 inputs of the causal conv (oldest first)
    ssm: Tensor  # [L, B, E, N] float32: h after the last token


# --------------------------------------------------------------------------- selective scan
#
# x, dt: [B, T, E] float32 (dt after softplus); A: [E, N] float32 (= -exp(A_log) < 0);
# Bm, Cm: [B, T, N] float32; h: [B, E, N] float32. Every implementation returns
# y [B, T, E] float32 (without the D skip) and the state after the last token [B, E, N].


def ssm_step(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h: Tensor):
    """One token of the selective SSM: transformers' ``mamba_selective_state_update``.

    x, dt: [B, E]; A: [E, N]; Bm, Cm: [B, N]; h: [B, E, N] -> y [B, E], new h [B, E, N].
    Runs in the dtype of its inputs (tests use float64 as ground truth).

    The operands are reshaped, not indexed, into broadcasting shapes (``-1`` for B): in an
    exported one-token graph that is one Reshape each instead of a Gather and an Unsqueeze.
    """
    y, h = _ssm_step_columns(x, dt, A, Bm, Cm, h)
    return y.reshape(-1, A.shape[0]), h


def _ssm_step_columns(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h: Tensor):
    """``ssm_step`` for x, dt, Bm, Cm of any shape holding [B, E] / [B, N] (e.g. [B, 1, E])
    -> y [B, E, 1] (a column per row: the mixer reshapes it once more), new h [B, E, N]."""
    E, N = A.shape
    dt, x = dt.reshape(-1, E, 1), x.reshape(-1, E, 1)  # [B, E, 1]
    dA = torch.exp(dt * A)  # [B, E, N] discretised A (ZOH)
    dBx = (dt * x) * Bm.reshape(-1, 1, N)  # [B, E, N] discretised B times x (Euler)
    h = torch.addcmul(dBx, h, dA)  # h * dA + dBx
    return torch.matmul(h, Cm.reshape(-1, N, 1)), h  # [B, E, 1]


def selective_scan_sequential(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h: Tensor):
    """Reference whole-sequence scan: ``ssm_step`` over T (transformers' recurrent loop in
    ``mamba_selective_scan``, started from ``h`` instead of zeros)."""
    ys = []
    for t in range(x.shape[1]):
        y, h = ssm_step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], h)
        ys.append(y)
    return torch.stack(ys, 1), h


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h: Tensor, segment: int | None = None):
    """Whole-sequence selective scan, pure PyTorch; same result as ``selective_scan_sequential``.

    Algorithm: the reference recurrence, token by token, organised for the CPU:
      * time is cut into segments of K = ``segment`` tokens (default SCAN_SEGMENT); per
        segment the decays exp2(dt A log2 e) and the inputs (dt x) B are computed for all
        K tokens at once into two preallocated [B, K, N, E] buffers that stay in cache,
      * then one ``addcmul`` per token, h = dA_t h + u_t, written in place over u_t, so the
        buffer ends up holding h for every token of the segment,
      * then y = C h for the segment as one batched matvec.
    The layout [B, K, N, E] (E innermost, contiguous) makes every broadcast a contiguous
    row operation; the state is transposed to [B, E, N] only at the boundaries.

    Exact up to float32 rounding (no rescaling, no division: every factor is a decay in
    [0, 1]). With autograd recording, the same steps run without ``out=`` buffers.

    Measured with bench/bench_scan.py (one layer of mamba-130m, E=1536, N=16, T=1024,
    batch 1, 2 threads, best of 3): this 13.9 ms; transformers' loop 180 ms; one
    ``ssm_step`` per token 76 ms; a two-level chunked scan (local scans of all chunks at
    once, carry, correction pass) 31-50 ms; log-space cumulative sums 63 ms and inf/nan
    once |A| sum(dt) > ~87 inside a chunk; Hillis-Steele doubling 41-46 ms; the optional
    C++ kernel 9.1 ms. What costs here: ~3.5 us of dispatch per torch op (so one op per
    token over [B, N, E], views made once per segment), exp (exp2 is ~2.7x cheaper), and
    a contiguous [N, E] operand in the broadcasts (a transposed view made the decay pass
    2.3x slower).
    """
    Bsz, T, E = x.shape
    N = A.shape[1]
    K = min(segment or SCAN_SEGMENT, T)
    a2 = (A * _LOG2E).T.contiguous()  # [N, E] decay exponent in base 2 (contiguous: vectorised broadcast)
    hs = h.transpose(1, 2)  # [B, N, E] view; only read
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, Bm, Cm, h)):
        return _selective_scan_autograd(x, dt, a2, Bm, Cm, hs, K)
    # Every buffer is allocated once per call and sized by K, not T (fresh [B, T, ...]
    # temporaries cost page faults that were measured to be as expensive as the ops)
    y = x.new_empty(Bsz, T, E)
    dA_buf = x.new_empty(Bsz, K, N, E)  # decays
    H_buf = x.new_empty(Bsz, K, N, E)  # inputs (dt x) B, overwritten by the states
    u_buf = x.new_empty(Bsz, K, 1, E)  # dt x
    y_buf = x.new_empty(Bsz, K, 1, E)  # C h
    carry = x.new_empty(Bsz, N, E)  # state between segments
    for s in range(0, T, K):
        k = min(K, T - s)
        dt_s = dt[:, s : s + k, None, :]  # [B, k, 1, E]
        dA = torch.mul(dt_s, a2, out=dA_buf[:, :k]).exp2_()  # [B, k, N, E]
        u = torch.mul(dt_s, x[:, s : s + k, None, :], out=u_buf[:, :k])  # [B, k, 1, E]
        H = torch.mul(u, Bm[:, s : s + k, :, None], out=H_buf[:, :k])  # [B, k, N, E]
        # views made once per segment: indexing inside the loop costs as much as the op
        for u_t, a_t in zip(H.unbind(1), dA.unbind(1)):  # [B, N, E] each
            hs = u_t.addcmul_(a_t, hs)  # h_t = dA_t h_(t-1) + u_t, over u_t
        C_s = Cm[:, s : s + k, None, :]  # [B, k, 1, N]
        if Bsz == 1:  # y's rows are contiguous: the matvec writes them directly
            torch.matmul(C_s, H, out=y[:, s : s + k, None, :])
        else:
            y[:, s : s + k] = torch.matmul(C_s, H, out=y_buf[:, :k])[:, :, 0]
        hs = carry.copy_(hs)  # H_buf is overwritten by the next segment
    return y, hs.transpose(1, 2).contiguous()


def _selective_scan_autograd(x: Tensor, dt: Tensor, a2: Tensor, Bm: Tensor, Cm: Tensor, hs: Tensor, K: int):
    """``selective_scan``'s steps without ``out=`` buffers, for autograd (a2: [N, E], hs: [B, N, E])."""
    ys = []
    for s in range(0, x.shape[1], K):
        dt_s = dt[:, s : s + K, None, :]  # [B, k, 1, E]
        dA = torch.exp2(dt_s * a2)  # [B, k, N, E]
        U = (dt_s * x[:, s : s + K, None, :]) * Bm[:, s : s + K, :, None]  # [B, k, N, E]
        states = []
        for u_t, a_t in zip(U.unbind(1), dA.unbind(1)):
            hs = torch.addcmul(u_t, a_t, hs)  # [B, N, E]
            states.append(hs)
        ys.append(torch.matmul(Cm[:, s : s + K, None, :], torch.stack(states, 1))[:, :, 0])  # [B, k, E]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, 1)
    return y, hs.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------- compiled scan (optional)
#
# The same scan as one fused C++ loop (kernels/mamba_scan.cpp, built on first use with
# the local compiler by torch.utils.cpp_extension.load). Selected by ``scan_impl="compiled"``
# (MambaMixer attribute / Mamba.set_kernels, "auto" where it builds and passes its
# self-check); the pure path above is the fallback and the one ONNX export traces.

# shipped as package data (pyproject.toml) next to this module: compiled where installed
_SCAN_SOURCE = Path(__file__).parent / "kernels" / "mamba_scan.cpp"

# -fno-trapping-math lets GCC if-convert the clamp and vectorise exp2_neg; -march=native
# because the build is local (the build name includes the CPU model, see below).
_SCAN_CFLAGS = ("-O3", "-march=native", "-fno-trapping-math")
# "op" -> the torch op, or "error" -> why it could not be built ("compiled selective scan
# unavailable: <reason>"); "status" -> compiled_scan_status()'s answer
_compiled: dict = {}
_UNAVAILABLE = "compiled selective scan unavailable: "
# a build's lock file (torch.utils.cpp_extension's FileBaton) older than this is a killed
# build's: torch would wait for it forever
_STALE_LOCK_S = 600.0
_LOCK_WAIT_S = 300.0  # how long another process's build is waited for


def _build_name() -> str:
    """The extension's name: a new one (a fresh build, a fresh op namespace) whenever the
    source, the flags, the CPU (-march=native) or torch change."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    parts = (*_SCAN_CFLAGS, cpu, torch.__version__)
    key = b"\0".join([_SCAN_SOURCE.read_bytes(), *(p.encode() for p in parts)])
    return "statecast_mamba_scan_" + hashlib.sha256(key).hexdigest()[:12]


def _toolchain_missing() -> str | None:
    """Why torch.utils.cpp_extension cannot build here (no compiler, no ninja), or None;
    checked before trying, so that a machine without them answers at once."""
    import os
    import shutil

    from torch.utils.cpp_extension import is_ninja_available

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx} not found)"
    if not is_ninja_available():
        return "no ninja (torch.utils.cpp_extension builds with it; pip install ninja)"
    return None


def _wait_for_lock(directory: str) -> None:
    """A build of this extension by another process holds ``directory/lock``: wait for it,
    at most :data:`_LOCK_WAIT_S`; remove a lock left by a killed build (older than
    :data:`_STALE_LOCK_S`), which torch would otherwise wait for forever."""
    import os
    import time

    lock = os.path.join(directory, "lock")
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            age = time.time() - os.stat(lock).st_mtime
        except OSError:
            return  # no lock
        if age > _STALE_LOCK_S:
            try:
                os.unlink(lock)
            except OSError:
                pass
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"another process is building it (lock file {lock})")
        time.sleep(0.2)


def _short(e: BaseException) -> str:
    """An exception in one line (a failed build's message holds the compiler's output)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def load_compiled_scan(verbose: bool = False):
    """Build (once per process; cached on disk by torch, so a later process only loads it)
    and return the compiled ops (``.selective_scan``, ``.causal_conv_silu``).

    Raises RuntimeError ("compiled selective scan unavailable: <reason>") when it cannot be
    built (no compiler, no ninja, a compile error, ...); the answer is kept for the process.
    """
    if "op" in _compiled:
        return _compiled["op"]
    if "error" in _compiled:
        raise RuntimeError(_compiled["error"])
    try:
        import os

        from torch.utils.cpp_extension import get_default_build_root, load

        missing = _toolchain_missing()
        if missing is not None:
            raise RuntimeError(missing)
        name = _build_name()
        _wait_for_lock(os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(), name))
        load(
            name,
            sources=[str(_SCAN_SOURCE)],
            extra_cflags=[*_SCAN_CFLAGS, f"-DSTATECAST_OP_NAMESPACE={name}"],
            is_python_module=False,
            verbose=verbose,
        )
        _compiled["op"] = getattr(torch.ops, name)
    except Exception as e:  # noqa: BLE001 - any build failure means "not available"
        reason = str(e) if isinstance(e, RuntimeError) and "\n" not in str(e) else _short(e)
        _compiled["error"] = _UNAVAILABLE + reason
        raise RuntimeError(_compiled["error"]) from e
    return _compiled["op"]


def _self_check() -> str | None:
    """Run both compiled kernels on a small random input (E not a multiple of the kernel's
    16-channel blocks, T not of anything) against the pure path: None when they agree to
    float32 rounding, else what went wrong. Milliseconds."""
    g = torch.Generator().manual_seed(1234)
    B, T, E, N, W = 2, 37, 40, 5, 4
    x = torch.randn(B, T, E, generator=g)
    dt = F.softplus(torch.randn(B, T, E, generator=g) - 1.0)
    A = -torch.exp(torch.randn(E, N, generator=g) * 0.5)
    Bm, Cm = torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
    h = torch.randn(B, E, N, generator=g)
    D, z = torch.randn(E, generator=g), torch.randn(B, T, E, generator=g)
    prev, w, bias = torch.randn(B, W - 1, E, generator=g), torch.randn(E, W, generator=g), torch.randn(E, generator=g)
    try:
        with torch.no_grad():
            y_ref, h_ref = selective_scan(x, dt, A, Bm, Cm, h)
            y_ref = (y_ref + x * D) * F.silu(z)
            y, h_out = selective_scan_compiled(x, dt, A, Bm, Cm, h, D, z)
            c_ref = MambaMixer._conv_silu(x, prev, w, bias)
            c = causal_conv_silu_compiled(x, prev, w, bias)
    except Exception as e:  # noqa: BLE001 - a kernel that fails to run is not usable
        return f"self-check failed: {_short(e)}"
    for what, got, ref in (("scan", y, y_ref), ("state", h_out, h_ref), ("conv", c, c_ref)):
        if got.shape != ref.shape:
            return f"self-check failed: {what} shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if not err <= 1e-4:  # NaN too
            return f"self-check failed: {what} relative error {err:.1e} against the pure path"
    return None


def compiled_scan_status() -> str | None:
    """None when the compiled kernels are usable here: they build (or load from torch's
    build cache) and pass :func:`_self_check` against the pure path; else why not, in a few
    words. Decided once per process."""
    if "status" not in _compiled:
        try:
            load_compiled_scan()
        except RuntimeError as e:
            _compiled["status"] = str(e).removeprefix(_UNAVAILABLE)
        else:
            _compiled["status"] = _self_check()
    return _compiled["status"]


def compiled_scan_available() -> bool:
    """Whether the compiled kernels build here and pass their self-check (decided once per
    process)."""
    return compiled_scan_status() is None


def _rows(t: Tensor) -> Tensor:
    """float32 with unit stride in the last dimension (row strides are free in the kernels)."""
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def selective_scan_compiled(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    h: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    out: Tensor | None = None,
):
    """``selective_scan`` as one fused C++ loop over T per block of 16 channels, vectorised
    over the channels (no autograd; float32 CPU). With ``D`` [E] and ``z`` [B, T, E] it
    also applies the D skip and the silu gate: y = (scan + D x) * silu(z), the mixer's
    next two steps, without two more passes over [B, T, E]. ``out`` (contiguous float32
    [B, T, E], may be ``dt`` itself) receives y instead of a fresh tensor."""
    op = load_compiled_scan().selective_scan
    a2 = (A.float() * _LOG2E).T.contiguous()  # [N, E]
    D = None if D is None else D.float().contiguous()
    z = None if z is None else _rows(z)
    return op(_rows(x), _rows(dt), a2, _rows(Bm), _rows(Cm), h.float().contiguous(), D, z, out)


def causal_conv_silu_compiled(x: Tensor, prev: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """silu(causal depthwise conv) as one C++ loop: x [B, T, E], prev [B, W-1, E] (the
    inputs before x, oldest first), weight [E, W], bias [E] -> [B, T, E] float32."""
    op = load_compiled_scan().causal_conv_silu
    bias = None if bias is None else bias.float().contiguous()
    return op(_rows(x), prev.float().contiguous(), weight.float().T.contiguous(), bias)


# --------------------------------------------------------------------------- mixer


class MambaMixer(nn.Module):
    """The Mamba mixer (paper fig. 3 "Mamba" block; transformers ``MambaMixer`` /
    ``FalconMambaMixer`` / ``JambaMambaMixer``): in_proj -> causal depthwise conv -> silu ->
    selective SSM (dt, B, C from x_proj) -> D skip -> silu(z) gate -> out_proj.

    Built from plain dimensions so that Jamba's and Zamba's Mamba layers reuse it. ``scan_impl``
    ("torch" default, or "compiled") picks the whole-sequence scan; the caller sets it.

    ``n_heads`` > 1 is Zamba's multi-head mixer (``ZambaMambaMixer``): the E channels after the
    conv are split into H heads of E/H consecutive channels, and each head has its own x_proj
    (so its own dt, B, C) and dt_proj; every head runs the same selective SSM on its channels,
    and the heads' outputs, concatenated, go through the one out_proj. The per-head tensors
    keep transformers' head axis (canonical shapes, H = n_heads, Eh = E / H):

        x_proj.weight [H, R+2N, Eh]   dt_proj.weight [H, Eh, R]   dt_proj.bias [H, Eh]
        A_log [H, Eh, N]              D [H, Eh]

    in_proj, conv1d and out_proj are as for one head ([x | z] halves of in_proj: Zamba's
    interleaved x/z rows are reordered on conversion), and so is the state: conv [B, E, W-1],
    ssm [B, E, N] with channel e = h * Eh + j. ``n_heads=1`` is the Mamba-1 mixer, unchanged:
    x_proj / dt_proj are ``nn.Linear`` and A_log [E, N], D [E] have no head axis.
    """

    def __init__(
        self,
        d_model: int,
        d_inner: int,
        d_state: int,
        d_conv: int,
        dt_rank: int,
        *,
        n_heads: int = 1,
        proj_bias: bool = False,
        conv_bias: bool = True,
        bcdt_norm: str = "none",
        bcdt_norm_eps: float = 1e-6,
    ):
        super().__init__()
        if bcdt_norm not in BCDT_NORMS:
            raise ValueError(f"bcdt_norm must be one of {BCDT_NORMS}, got {bcdt_norm!r}")
        if n_heads < 1 or d_inner % n_heads:
            raise ValueError(f"n_heads must be a positive divisor of d_inner ({d_inner}), got {n_heads!r}")
        C, E, N, W, R, H = d_model, d_inner, d_state, d_conv, dt_rank, n_heads
        self.d_inner, self.d_state, self.d_conv, self.dt_rank, self.n_heads = E, N, W, R, H
        self.bcdt_norm, self.bcdt_norm_eps = bcdt_norm, bcdt_norm_eps
        self.scan_impl = "torch"
        self.in_proj = nn.Linear(C, 2 * E, bias=proj_bias)  # -> [x | z]
        # depthwise causal conv, HF's weight shape [E, 1, W]; the padding is unused (we carry state)
        self.conv1d = nn.Conv1d(E, E, W, groups=E, bias=conv_bias)
        if H == 1:
            self.x_proj = nn.Linear(E, R + 2 * N, bias=False)  # -> [dt | B | C]
            self.dt_proj = nn.Linear(R, E, bias=True)
            self.A_log = nn.Parameter(torch.empty(E, N))  # A = -exp(A_log)
            self.D = nn.Parameter(torch.empty(E))
        else:  # per head: [H, ...] (see the class docstring)
            self.x_proj = HeadLinear(H, E // H, R + 2 * N)
            self.dt_proj = HeadLinear(H, R, E // H, bias=True)
            self.A_log = nn.Parameter(torch.empty(H, E // H, N))
            self.D = nn.Parameter(torch.empty(H, E // H))
        self.out_proj = nn.Linear(E, C, bias=proj_bias)
        if bcdt_norm == "rms_weighted":
            self.dt_norm = RMSNorm(R, eps=bcdt_norm_eps)
            self.b_norm = RMSNorm(N, eps=bcdt_norm_eps)
            self.c_norm = RMSNorm(N, eps=bcdt_norm_eps)
        if not self.A_log.is_meta:
            self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: MambaConfig) -> "MambaMixer":
        return cls(
            cfg.d_model,
            cfg.d_inner,
            cfg.d_state,
            cfg.d_conv,
            cfg.dt_rank,
            proj_bias=cfg.proj_bias,
            conv_bias=cfg.conv_bias,
            bcdt_norm=cfg.bcdt_norm,
            bcdt_norm_eps=cfg.bcdt_norm_eps,
        )

    @torch.no_grad()
    def reset_parameters(
        self,
        generator: torch.Generator | None = None,
        init_std: float = 0.1,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_floor: float = 1e-4,
    ) -> None:
        """transformers' ``MambaPreTrainedModel._init_weights`` for one mixer (defaults of
        ``MambaConfig``: initializer_range 0.1, time_step 1e-3..0.1, floor 1e-4, "random"
        dt_proj init, no prenorm rescale): S4D-real A_log = log(1..N), D = 1, dt_proj bias
        = softplus^-1 of a log-uniform dt, kaiming-uniform conv and out_proj."""
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        # (reshaped to the head layout when n_heads > 1: ZambaPreTrainedModel._init_weights)
        self.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(E, N).reshape(self.A_log.shape))
        self.D.fill_(1.0)
        for lin in (self.in_proj, self.x_proj):
            lin.weight.normal_(0.0, init_std, generator=generator)
            if lin.bias is not None:
                lin.bias.zero_()
        std = R**-0.5
        self.dt_proj.weight.uniform_(-std, std, generator=generator)
        u = torch.rand(E, generator=generator, dtype=torch.float32)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_proj.bias.copy_((dt + torch.log(-torch.expm1(-dt))).reshape(self.dt_proj.bias.shape))  # inverse softplus
        nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5), generator=generator)
        if self.conv1d.bias is not None:
            self.conv1d.bias.zero_()
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5), generator=generator)
        if self.out_proj.bias is not None:
            self.out_proj.bias.zero_()
        if self.bcdt_norm == "rms_weighted":
            for norm in (self.dt_norm, self.b_norm, self.c_norm):
                norm.reset_parameters()

    def _norm(self, t: Tensor, which: str) -> Tensor:
        if self.bcdt_norm == "none":
            return t
        if self.bcdt_norm == "rms":  # FalconMambaWeightlessRMSNorm
            return rms_norm(t, None, self.bcdt_norm_eps)
        return getattr(self, which)(t)  # JambaRMSNorm

    def forward(self, x: Tensor, conv: Tensor, ssm: Tensor):
        """x [B, T, C] (normed residual stream), conv [B, E, W-1], ssm [B, E, N] float32
        -> out [B, T, C], new conv [B, E, W-1], new ssm [B, E, N]. T == 1 is the one-step
        recurrence (HF ``causal_conv1d_update`` + ``mamba_selective_state_update``)."""
        T = x.shape[1]
        E, N, R, W, H = self.d_inner, self.d_state, self.dt_rank, self.d_conv, self.n_heads
        dtype = x.dtype
        # autograd will record this call: no in-place rewrites of saved tensors, no C++ kernels
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        # the optional C++ kernels: float32, T > 1, no autograd (they have no backward)
        compiled = self.scan_impl == "compiled" and T > 1 and dtype == torch.float32 and not needs_grad
        xz = self.in_proj(x)  # [B, T, 2E]
        xi, z = xz[..., :E], xz[..., E:]  # [B, T, E] each (strided views)

        # 1. causal depthwise conv over [previous W-1 inputs | this call's T], then silu
        w = self.conv1d.weight[:, 0].float()  # [E, W], tap W-1 = the current token
        bias = self.conv1d.bias
        if T == 1:  # HF causal_conv1d_update: one window
            window = torch.cat([conv, xi.transpose(1, 2).to(conv.dtype)], dim=2)  # [B, E, W] oldest first
            acc = (window.float() * w).sum(-1)[:, None, :]  # [B, 1, E]
            if bias is not None:
                acc = acc + bias.float()
            new_conv = window[:, :, 1:]  # [B, E, W-1]
            xa = F.silu(acc).to(dtype)  # [B, 1, E]
        else:  # HF causal_conv1d_fn, started from the carried inputs instead of zeros
            prev = conv.transpose(1, 2)  # [B, W-1, E] the inputs before this call, oldest first
            if compiled:
                xa = causal_conv_silu_compiled(xi, prev, w, bias)  # [B, T, E]
            else:
                xa = self._conv_silu(xi, prev, w, bias).to(dtype)
            if T >= W - 1:
                new_conv = xi[:, T - (W - 1) :].transpose(1, 2)  # [B, E, W-1] view of the last inputs
            else:
                new_conv = torch.cat([conv[:, :, T:], xi.transpose(1, 2).to(conv.dtype)], dim=2)

        # 2. input-dependent dt, B, C (Falcon / Jamba: RMS-normalised); per head: [B, T, H, ...]
        dbc = self.x_proj(xa if H == 1 else xa.unflatten(-1, (H, E // H)))  # [B, T, (H,) R + 2N]
        dt_r = self._norm(dbc[..., :R], "dt_norm")  # [B, T, (H,) R]
        Bm = self._norm(dbc[..., R : R + N], "b_norm").float()  # [B, T, (H,) N]
        Cm = self._norm(dbc[..., R + N :], "c_norm").float()  # [B, T, (H,) N]
        # HF: dt_proj.weight @ dt (no bias), + bias in float32, softplus
        if H == 1:
            dt = F.linear(dt_r, self.dt_proj.weight).float().add_(self.dt_proj.bias.float())  # [B, T, E]
        else:  # [B, T, H, Eh] -> [B, T, E], channel e = h * Eh + j
            dt = per_head_linear(dt_r, self.dt_proj.weight).flatten(-2).float().add_(self.dt_proj.bias.float().reshape(E))
        if needs_grad or is_exporting():  # softplus.out has no ONNX symbolic
            dt = F.softplus(dt)
        else:  # in place: one fresh [B, T, E] buffer less (see "Memory" in the module docstring)
            dt = torch.ops.aten.softplus.out(dt, 1, 20, out=dt)
        A = -torch.exp(self.A_log.float())  # [E, N] (per head: [H, Eh, N])
        D = self.D if H == 1 else self.D.reshape(E)  # [E]

        # 3. selective SSM, D skip, silu(z) gate (float32)
        xf = xa.float()
        if T == 1:  # [B, 1, E] / [B, 1, N] operands reshaped, not indexed (see ssm_step)
            step = _ssm_step_columns if H == 1 else self._ssm_step_heads
            y, ssm = step(xf, dt, A, Bm, Cm, ssm.float())
            y = (y.reshape(-1, 1, E) + xf * D.float()) * F.silu(z.float())  # [B, 1, E]
        elif H > 1:  # per head, transformers' loop over heads (no compiled kernel for heads)
            y, ssm = self._scan_heads(xf, dt, A, Bm, Cm, ssm.float())
            y = y.addcmul_(xf, D.float()).mul_(F.silu(z.float()))
        elif compiled:
            y, ssm = selective_scan_compiled(xf, dt, A, Bm, Cm, ssm, self.D, z, out=dt)  # gated inside, over dt
        else:
            y, ssm = selective_scan(xf, dt, A, Bm, Cm, ssm.float())
            # y is a fresh buffer: in place is safe, also for autograd; so is z (a view of
            # this call's in_proj output) when nothing records it for backward
            gate = F.silu(z.float()) if needs_grad or z.dtype != torch.float32 else F.silu(z, inplace=True)
            y = y.addcmul_(xf, self.D.float()).mul_(gate)
        out = self.out_proj(y.to(dtype))  # [B, T, C]
        # (a cast only when needed: the tracer records even a same-dtype .to() as a Cast node)
        return out, new_conv if new_conv.dtype == conv.dtype else new_conv.to(conv.dtype), ssm

    @staticmethod
    def _ssm_step_heads(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h: Tensor):
        """One token of H heads' SSMs: x, dt [B, 1, E]; A [H, Eh, N]; Bm, Cm [B, 1, H, N]; h [B, E, N]
        -> y [B, E, 1], new h [B, E, N] (``ssm_step`` with each head's own B and C)."""
        H, Eh, N = A.shape
        dt, x = dt.reshape(-1, H, Eh, 1), x.reshape(-1, H, Eh, 1)  # [B, H, Eh, 1]
        dA = torch.exp(dt * A)  # [B, H, Eh, N]
        dBx = (dt * x) * Bm.reshape(-1, H, 1, N)
        h = torch.addcmul(dBx, h.reshape(-1, H, Eh, N), dA)
        y = torch.matmul(h, Cm.reshape(-1, H, N, 1))  # [B, H, Eh, 1]
        return y.reshape(-1, H * Eh, 1), h.reshape(-1, H * Eh, N)

    @staticmethod
    def _scan_heads(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, h: Tensor):
        """``selective_scan`` per head: x, dt [B, T, E]; A [H, Eh, N]; Bm, Cm [B, T, H, N];
        h [B, E, N] -> y [B, T, E], final h [B, E, N]."""
        H, Eh, _ = A.shape
        ys, hs = [], []
        for k in range(H):
            c = slice(k * Eh, (k + 1) * Eh)
            y, hk = selective_scan(x[..., c], dt[..., c], A[k], Bm[:, :, k], Cm[:, :, k], h[:, c])
            ys.append(y)
            hs.append(hk)
        return torch.cat(ys, -1), torch.cat(hs, 1)

    @staticmethod
    def _conv_silu(xi: Tensor, prev: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """silu(causal depthwise conv), float32: xi [B, T, E], prev [B, W-1, E] -> [B, T, E].

        Tap k (weight w[:, k]) sees the input W-1-k steps back: one multiply-add over the
        positions whose input is in xi, one over the first few positions whose input is in
        prev. No concatenated copy of the input."""
        T, W = xi.shape[1], w.shape[1]
        cur = w[:, W - 1]
        acc = xi * cur if bias is None else torch.addcmul(bias.float(), xi, cur)  # [B, T, E] float32
        acc = acc.float()
        for k in range(W - 1):
            s = W - 1 - k  # steps back
            if T > s:
                acc[:, s:].addcmul_(xi[:, : T - s], w[:, k])
            n = min(s, T)  # positions t < s read prev[W-1-s+t]
            acc[:, :n].addcmul_(prev[:, W - 1 - s : W - 1 - s + n], w[:, k])
        return F.silu(acc, inplace=not acc.requires_grad)


# --------------------------------------------------------------------------- block / model


class MambaBlock(nn.Module):
    """x + mamba(norm(x)), residual in float32 when ``residual_in_fp32`` (HF ``MambaBlock``;
    Mamba-2's block is the same around its own mixer: ``mixer_class``)."""

    mixer_class = None  # set below: MambaMixer (Mamba2Block: Mamba2Mixer)

    def __init__(self, cfg):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mamba = self.mixer_class.from_config(cfg)

    def forward(self, x: Tensor, conv: Tensor, ssm: Tensor):
        # x: [B, T, C] residual stream (float32 after the first block when residual_in_fp32)
        h = self.mixer_norm(x.to(self.mixer_norm.weight.dtype))
        res = x.float() if self.residual_in_fp32 else x
        out, conv, ssm = self.mamba(h, conv, ssm)
        return res + out, conv, ssm


MambaBlock.mixer_class = MambaMixer


class Mamba(CausalLM):
    """Embedding, blocks, final norm, head: Mamba-1, and Mamba-2 through ``block_class`` /
    ``state_type`` (``arch/mamba2.py``)."""

    block_class = MambaBlock
    state_type = MambaState

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(self.block_class(cfg) for _ in range(cfg.n_layer))
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)  # HF norm_f
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if not self.embed.weight.is_meta:  # a meta model (shapes only) needs no init
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random init after transformers' ``MambaPreTrainedModel._init_weights`` (default
        ``MambaConfig``): every mixer as ``MambaMixer.reset_parameters``, embedding and
        untied head normal(0, 0.1), norms ones."""
        for layer in self.layers:
            layer.mamba.reset_parameters(generator)
            layer.mixer_norm.reset_parameters()
        self.embed.weight.normal_(0.0, 0.1, generator=generator)
        if self.lm_head is not None:
            self.lm_head.weight.normal_(0.0, 0.1, generator=generator)
        self.final_norm.reset_parameters()

    def set_kernels(self, impl: str, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> str:
        """Choose the whole-sequence scan of every mixer and return which one runs.

        "torch": the pure path (a new model's). "compiled": the C++ kernels (built now;
        RuntimeError if they cannot be built or fail their self-check). "auto": the compiled
        kernels where they apply (a float32 model on the CPU) and are usable here
        (:func:`compiled_scan_status`), else the pure path. Returns "torch", "compiled", or
        for "auto" falling back "torch (compiled kernel unavailable: <why>)": what a report
        records. ``device`` / ``dtype``: where and how the model will run (default: its
        embedding's, the right answer once the weights are loaded)."""
        if impl not in ("auto", *SCAN_IMPLS):
            raise ValueError(f"scan_impl must be one of {('auto', *SCAN_IMPLS)}, got {impl!r}")
        used = impl
        if impl == "compiled":
            load_compiled_scan()
            why = compiled_scan_status()
            if why is not None:
                raise RuntimeError(_UNAVAILABLE + why)
        elif impl == "auto":
            device = torch.device(self.embed.weight.device if device is None else device)
            dtype = self.embed.weight.dtype if dtype is None else dtype
            if device.type != "cpu":
                why = f"it runs on the CPU, the model on {device.type}"
            elif dtype != torch.float32:
                why = f"it computes in float32, the model in {str(dtype).removeprefix('torch.')}"
            else:
                why = compiled_scan_status()
            used = "compiled" if why is None else f"torch (compiled kernel unavailable: {why})"
        for layer in self.layers:
            layer.mamba.scan_impl = "compiled" if used == "compiled" else "torch"
        return used

    def state_layers(self) -> dict[str, tuple[int, ...]]:
        return every_layer(self.state_type._fields, self.cfg.n_layer)

    def init_state(self, batch: int, device=None) -> MambaState:
        cfg = self.cfg
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype
        L, E = cfg.n_layer, cfg.d_inner
        conv = torch.zeros(L, batch, E, cfg.d_conv - 1, dtype=dtype, device=device)
        ssm = torch.zeros(L, batch, E, cfg.d_state, dtype=torch.float32, device=device)
        return MambaState(conv, ssm)

    def forward(self, input_ids: Tensor, state: MambaState | None = None, *, output_hidden: bool = False):
        """input_ids [B, T] -> logits [B, T, V], new state (+ per-layer residual streams).

        T > 1 runs the whole-sequence scan, T == 1 the one-step recurrence; both start from
        ``state`` (None: empty history) and return the state after the last token. With
        ``output_hidden`` a third value: one [B, T, C] tensor per layer, the residual stream
        after that block (HF's ``hidden_states[:L]``; its last entry is ``norm_f`` of ours).
        """
        if state is None:
            state = self.init_state(input_ids.shape[0], input_ids.device)
        x = self.embed_tokens(input_ids)  # [B, T, C]
        # one pass through the layers: unlike RWKV (its PREFILL_SEGMENT), segmenting the
        # prefill changed mamba-130m's forward at T=2048 by < 1% (bench/README.md)
        hidden = [] if output_hidden else None
        x, state = self._layers(x, state, hidden)
        logits = self.head_logits(self.final_norm(x))  # [B, T, V]
        if output_hidden:
            return logits, state, hidden
        return logits, state

    def _layers(self, x: Tensor, state: MambaState, hidden: list[Tensor] | None):
        # x: [B, T, C] embedded input -> residual stream after the last block, new state;
        # appends each block's output to ``hidden`` when given
        convs, ssms = [], []
        for i, layer in enumerate(self.layers):
            x, conv, ssm = layer(x, state.conv[i], state.ssm[i])
            convs.append(conv)
            ssms.append(ssm)
            if hidden is not None:
                hidden.append(x)
        return x, self.state_type(stack_layers(convs), stack_layers(ssms))
