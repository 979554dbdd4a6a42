"""Mamba's whole-sequence selective scan on CPU: candidate algorithms, and the full forward
against the GEMM floor and transformers.

    .venv/bin/python bench/bench_scan.py [--quick] [--json] [--threads N] [--lengths 1024 2048]
                                         [--no-hf] [--no-compiled]

Random weights of the mamba-130m shape (24 layers, d_model 768, d_inner 1536, d_state 16,
d_conv 4, dt_rank 48, vocab 50280), float32, batch 1, under torch.inference_mode().
Measured in one run:
  GEMM floor     the model's matrix products alone: per layer in_proj [T,768]x[768,3072],
                 x_proj [T,1536]x[1536,80], dt_proj [T,48]x[48,1536], out_proj
                 [T,1536]x[1536,768], times 24, plus the head [T,768]x[768,50280]; torch.mm
                 on preallocated random inputs into preallocated outputs. The ratios use
                 this strict floor; "outputs allocated" (same products, fresh outputs, as a
                 model must return fresh logits) is printed alongside
  ours           Mamba.forward with the pure-PyTorch scan (--kernels torch), and with the
                 compiled scan (scan_impl="compiled") when it builds here and passes its
                 self-check; the output names which of the two the default settings
                 (--kernels auto) run
  transformers   MambaForCausalLM.forward on the same weights (its CPU path: the per-token
                 loop of mamba_selective_scan). Too slow to repeat in full: one block
                 (backbone.layers[0]) is timed and scaled by 24, plus embedding, norm_f and
                 head timed alone ("est." in the table); --hf-full times the whole model once
  scan alone     one layer's scan (E=1536, N=16) on realistic inputs, per algorithm:
                   hf_loop      transformers' mamba_selective_scan (materialises [E,T,N])
                   sequential   one ssm_step per token (allocating), our reference
                   segmented    statecast's selective_scan, K tokens per segment (the default)
                   chunked      two-level: local scans inside K-token chunks, all chunks at
                                once, then a carry loop over chunks and a correction pass
                   logspace     cumulative sums of dt inside K-token chunks, h = e^cs *
                                cumsum(e^-cs u): overflows once |A| * sum(dt) > ~87 inside
                                one chunk (reported as "overflow" when it does)
                   doubling     Hillis-Steele prefix scan inside segments (log2 K passes)
                   compiled     the optional C++ kernel (one fused loop, vectorised over E)
Ratios are of best times (medians are printed too). No wall-clock threshold is asserted.
"""

from __future__ import annotations

import math

import torch
from common import (
    SHAPES,
    base_args,
    emit,
    environment,
    gemm_floor_fn,
    model_pair,
    print_table,
    set_threads,
    time_fn,
    time_interleaved,
)

import statecast.arch.mamba as mamba_mod
from statecast.arch.mamba import MambaConfig, selective_scan, selective_scan_sequential

MAMBA_130M = SHAPES["mamba-130m"][1]
LOG2E = 1.0 / math.log(2.0)


# --------------------------------------------------------------------------- candidate scans
# Same contract as statecast.arch.mamba.selective_scan: x, dt [B,T,E]; A [E,N]; Bm, Cm
# [B,T,N]; h [B,E,N] -> y [B,T,E], h_T [B,E,N]. All float32, no autograd.


def scan_hf(x, dt, A, Bm, Cm, h):
    """transformers' mamba_selective_scan, CPU path (it starts from zeros: h is ignored)."""
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    y, hT = mamba_selective_scan(
        x.transpose(1, 2), dt.transpose(1, 2), A, Bm.transpose(1, 2), Cm.transpose(1, 2), return_last_state=True
    )
    return y.transpose(1, 2), hT


def scan_chunked(x, dt, A, Bm, Cm, h, K=16, seg=128):
    """Two-level scan: every K-token chunk of a seg-token segment scanned locally at once
    (K ops over [B, n_chunks, N, E]), then the chunks' carries, then one correction pass."""
    Bsz, T, E = x.shape
    N = A.shape[1]
    a2 = (A * LOG2E).T.contiguous()  # [N, E]
    hs = h.transpose(1, 2).contiguous()  # [B, N, E]
    y = x.new_empty(Bsz, T, E)
    for s0 in range(0, T, seg):
        L = min(seg, T - s0)
        nc = -(-L // K)
        pad = nc * K - L  # dt = 0 at the end: decay 1, input 0, so the final state is unchanged
        dts, xs = dt[:, s0 : s0 + L], x[:, s0 : s0 + L]
        Bs, Cs = Bm[:, s0 : s0 + L], Cm[:, s0 : s0 + L]
        if pad:
            dts, xs, Bs, Cs = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (dts, xs, Bs, Cs))
        P = torch.mul(dts[:, :, None, :], a2).exp2_().view(Bsz, nc, K, N, E)
        U = torch.mul((dts * xs)[:, :, None, :], Bs[:, :, :, None]).view(Bsz, nc, K, N, E)
        for k in range(1, K):
            U[:, :, k].addcmul_(P[:, :, k], U[:, :, k - 1])
            P[:, :, k].mul_(P[:, :, k - 1])
        h_in = []
        for c in range(nc):
            h_in.append(hs)
            hs = torch.addcmul(U[:, c, K - 1], P[:, c, K - 1], hs)
        U.addcmul_(P, torch.stack(h_in, 1)[:, :, None])
        yy = torch.matmul(Cs.view(Bsz, nc, K, 1, N), U)[..., 0, :].reshape(Bsz, nc * K, E)
        y[:, s0 : s0 + L] = yy[:, :L]
    return y, hs.transpose(1, 2).contiguous()


def scan_logspace(x, dt, A, Bm, Cm, h, K=16):
    """Log-space chunks: cs = A * cumsum(dt) inside each chunk, h_k = e^cs_k (h_in +
    sum_j<=k e^-cs_j u_j). e^-cs overflows (inf/nan) once |A| * sum(dt) > ~87 in a chunk."""
    Bsz, T, E = x.shape
    a2 = (A * LOG2E).T.contiguous()  # [N, E]
    hs = h.transpose(1, 2).contiguous()
    y = x.new_empty(Bsz, T, E)
    for s0 in range(0, T, K):
        k = min(K, T - s0)
        cs = torch.cumsum(dt[:, s0 : s0 + k], 1)[:, :, None, :] * a2  # [B, k, N, E] <= 0, log2
        ecs = torch.exp2(cs)
        u = (dt[:, s0 : s0 + k] * x[:, s0 : s0 + k])[:, :, None, :] * Bm[:, s0 : s0 + k, :, None]
        H = torch.cumsum(u.mul_(torch.exp2(cs.neg_())), 1).add_(hs[:, None]).mul_(ecs)  # [B, k, N, E]
        y[:, s0 : s0 + k] = torch.matmul(Cm[:, s0 : s0 + k, None, :], H)[:, :, 0]
        hs = H[:, -1]
    return y, hs.transpose(1, 2).contiguous()


def scan_doubling(x, dt, A, Bm, Cm, h, seg=64):
    """Hillis-Steele inclusive scan of (decay, input) pairs inside each segment (log2 seg
    passes over [B, seg, N, E]), then the incoming state added with the prefix decays."""
    Bsz, T, E = x.shape
    a2 = (A * LOG2E).T.contiguous()
    hs = h.transpose(1, 2).contiguous()
    y = x.new_empty(Bsz, T, E)
    for s0 in range(0, T, seg):
        k = min(seg, T - s0)
        P = torch.mul(dt[:, s0 : s0 + k, None, :], a2).exp2_()  # [B, k, N, E]
        U = (dt[:, s0 : s0 + k] * x[:, s0 : s0 + k])[:, :, None, :] * Bm[:, s0 : s0 + k, :, None]
        d = 1
        while d < k:
            U[:, d:] = torch.addcmul(U[:, d:], P[:, d:], U[:, :-d])
            P[:, d:] = P[:, d:] * P[:, :-d]
            d *= 2
        U.addcmul_(P, hs[:, None])
        y[:, s0 : s0 + k] = torch.matmul(Cm[:, s0 : s0 + k, None, :], U)[:, :, 0]
        hs = U[:, -1]
    return y, hs.transpose(1, 2).contiguous()


def scan_inputs(T: int, E: int = 1536, N: int = 16, seed: int = 0):
    """Inputs with the statistics of a real layer: dt = softplus of a log-uniform-initialised
    bias plus noise (about 1e-3 .. 0.3), A = -(1..N) spread by a random factor, unit x, B, C."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.exp(torch.rand(E, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    bias = bias + torch.log(-torch.expm1(-bias))
    dt = torch.nn.functional.softplus(bias + 0.5 * torch.randn(1, T, E, generator=g))
    A = -torch.arange(1, N + 1, dtype=torch.float32).expand(E, N) * torch.exp(0.3 * torch.randn(E, N, generator=g))
    x = torch.randn(1, T, E, generator=g)
    Bm, Cm = torch.randn(1, T, N, generator=g), torch.randn(1, T, N, generator=g)
    h = torch.randn(1, E, N, generator=g)
    return x, dt, A, Bm, Cm, h


def scan_candidates(compiled: bool) -> dict:
    c = {
        "hf_loop": scan_hf,
        "sequential": selective_scan_sequential,
        "segmented K=8": lambda *a: selective_scan(*a, segment=8),
        "segmented K=16": lambda *a: selective_scan(*a, segment=16),
        "segmented K=32": lambda *a: selective_scan(*a, segment=32),
        "segmented K=64": lambda *a: selective_scan(*a, segment=64),
        "chunked K=8 seg=128": lambda *a: scan_chunked(*a, K=8, seg=128),
        "chunked K=16 seg=128": lambda *a: scan_chunked(*a, K=16, seg=128),
        "chunked K=16 seg=256": lambda *a: scan_chunked(*a, K=16, seg=256),
        "logspace K=16": lambda *a: scan_logspace(*a, K=16),
        "logspace K=32": lambda *a: scan_logspace(*a, K=32),
        "doubling seg=32": lambda *a: scan_doubling(*a, seg=32),
        "doubling seg=64": lambda *a: scan_doubling(*a, seg=64),
    }
    if compiled:
        c["compiled"] = mamba_mod.selective_scan_compiled
    return c


def check_scan(fn, zero_state: bool = False) -> float | str:
    """Relative max error against the float64 sequential scan (T=96), or "overflow"."""
    x, dt, A, Bm, Cm, h = scan_inputs(96, E=256, seed=1)
    if zero_state:
        h = torch.zeros_like(h)
    ref_y, ref_h = selective_scan_sequential(*(t.double() for t in (x, dt, A, Bm, Cm, h)))
    y, hT = fn(x, dt, A, Bm, Cm, h)
    if not (torch.isfinite(y).all() and torch.isfinite(hT).all()):
        return "overflow"
    err_y = ((y.double() - ref_y).abs().max() / ref_y.abs().max()).item()
    err_h = ((hT.double() - ref_h).abs().max() / ref_h.abs().max()).item()
    return max(err_y, err_h)


# --------------------------------------------------------------------------- GEMM floor / models


def main() -> None:
    p = base_args(__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default 1024 2048)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--hf-full", action="store_true", help="also time transformers' whole forward once")
    p.add_argument("--no-compiled", action="store_true", help="skip the optional compiled scan")
    p.add_argument("--scan-only", action="store_true", help="only the scan candidates")
    args = p.parse_args()
    set_threads(args.threads)
    lengths = args.lengths or ([256] if args.quick else [1024, 2048])
    repeats = args.repeats or (2 if args.quick else 5)
    dims = dict(MAMBA_130M, n_layer=4) if args.quick else MAMBA_130M
    cfg = MambaConfig(**dims)
    result: dict = {"environment": environment(), "config": dims, "lengths": lengths, "runs": []}

    compiled = False
    if not args.no_compiled:
        compiled = mamba_mod.compiled_scan_available()
        if not compiled:
            result["compiled_error"] = mamba_mod.compiled_scan_status()

    model, hf = model_pair("mamba-130m", seed=0, **dims)
    result["default_kernels"] = model.set_kernels("auto")  # what --kernels auto runs here
    model.set_kernels("torch")
    if args.no_hf or args.scan_only:
        hf = None

    with torch.inference_mode():
        cands = scan_candidates(compiled)
        accuracy = {name: check_scan(fn, zero_state=(name == "hf_loop")) for name, fn in cands.items()}
        for T in lengths:
            run: dict = {"T": T}
            ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))

            # scan alone, one layer
            inputs = scan_inputs(T, E=cfg.d_inner, N=cfg.d_state)
            slow = {"hf_loop", "sequential"}
            scan_t = {}
            for name, fn in cands.items():
                reps = 1 if name in slow else repeats
                scan_t[name] = time_fn(lambda fn=fn: fn(*inputs), repeats=reps, warmup=0 if name in slow else 1)
            run["scan"] = scan_t

            if not args.scan_only:
                fns = {"GEMM floor": gemm_floor_fn(model, T), "GEMM floor, outputs allocated": gemm_floor_fn(model, T, False)}

                def ours(impl):
                    def f():
                        model.set_kernels(impl)
                        model(ids)

                    return f

                fns["ours (torch scan)"] = ours("torch")
                if compiled:
                    fns["ours (compiled scan)"] = ours("compiled")
                run["forward"] = time_interleaved(fns, repeats=repeats)
                model.set_kernels("torch")

                if hf is not None:
                    x = hf.backbone.embeddings(ids)
                    blk = hf.backbone.layers[0]
                    t_block = time_fn(lambda: blk(x), repeats=1 if not args.quick else 1, warmup=0)
                    hidden = torch.randn(1, T, cfg.d_model)
                    t_rest = time_fn(
                        lambda: (hf.backbone.embeddings(ids), hf.lm_head(hf.backbone.norm_f(hidden))), repeats=repeats
                    )
                    run["hf_block"] = t_block
                    run["hf_rest"] = t_rest
                    run["hf_est"] = cfg.n_layer * t_block.best + t_rest.best
                    if args.hf_full:
                        run["hf_full"] = time_fn(lambda: hf(ids), repeats=1, warmup=0)
            result["runs"].append(run)
    result["accuracy"] = accuracy

    if args.json:
        emit(result, True)
        return
    env = result["environment"]
    print(
        f"Mamba scan / forward, {cfg.n_layer} layers, E={cfg.d_inner}, N={cfg.d_state}, fp32, batch 1, "
        f"{env['threads']} threads, torch {env['torch']}, {env['processor']}"
    )
    print(f"default settings (--kernels auto) run: {result['default_kernels']}")
    for run in result["runs"]:
        T = run["T"]
        rows = []
        for name, t in run["scan"].items():
            acc = accuracy[name]
            rows.append(
                [name, t.best * 1e3, t.median * 1e3, t.best * 1e3 * cfg.n_layer, acc if isinstance(acc, str) else f"{acc:.1e}"]
            )
        print_table(
            f"T={T}: scan alone, one layer",
            ["algorithm", "best ms", "median ms", "x L ms", "rel err"],
            rows,
            ["rel err: vs the float64 sequential scan at T=96 (hf_loop from a zero state)"],
        )
        if "forward" in run:
            fw = run["forward"]
            floor = fw["GEMM floor"].best
            rows = [[name, t.best, t.median, t.best / floor, t.contended] for name, t in fw.items()]
            notes = []
            if "hf_est" in run:
                rows.append(["transformers (est.)", run["hf_est"], "", run["hf_est"] / floor, ""])
                notes.append(
                    f"transformers est. = {cfg.n_layer} x one block ({run['hf_block'].best:.3f} s) "
                    f"+ embedding, norm_f and head ({run['hf_rest'].best:.3f} s)"
                )
            if "hf_full" in run:
                rows.append(["transformers (full, once)", run["hf_full"].best, "", run["hf_full"].best / floor, ""])
            print_table(f"T={T}: full forward", ["what", "best s", "median s", "/ floor", "contended"], rows, notes)


if __name__ == "__main__":
    main()
