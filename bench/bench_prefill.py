"""Whole-sequence (prefill) speed of statecast's RWKV-4 against transformers and the GEMM floor.

    .venv/bin/python bench/bench_prefill.py [--quick] [--json] [--threads N]

169M shape (12 layers, C=A=768, F=3072, V=50277), random weights, float32, batch 1.
Measured in one run, all under torch.inference_mode():
  statecast     Rwkv.forward (chunked WKV)
  transformers  RwkvForCausalLM.forward on CPU (rescale_every=0; its WKV is a Python
                loop over T), holding the same weights as statecast's model
  GEMM floor    only the model's matrix products, same shapes, on preallocated random
                tensors into preallocated outputs: per layer k/v/r [T,C]x[C,A], output
                [T,A]x[A,C], up [T,C]x[C,F], down [T,F]x[F,C], receptance [T,C]x[C,C];
                times L; plus the head [T,C]x[C,V]. The ratios use this strict floor;
                "floor alloc" (same products, outputs allocated) is printed alongside
  WKV alone     the whole-sequence WKV of one layer's shape ([1, T, A] random k, v,
                decays spread like the init schedule), times L: statecast's chunked
                form for each chunk length in --wkv-chunks, and the float32 loop over T
                (``wkv_sequential``, the algorithm transformers runs on CPU)
Ratios are of best times (medians are printed too). No wall-clock threshold is asserted.
"""

from __future__ import annotations

import torch
from common import (
    RWKV_169M,
    base_args,
    emit,
    environment,
    print_table,
    rwkv_pair,
    set_threads,
    time_fn,
    time_interleaved,
)


def gemm_floor_fn(T: int, C: int, A: int, Fd: int, V: int, L: int, preallocated: bool = True):
    """A closure running the forward's matrix products alone (fp32, batch 1).

    preallocated: write into preallocated outputs (the strict floor); False allocates
    every output like a model does (fresh large buffers cost page faults: the [T, V]
    logits alone are 206 MB at T=1024)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    x_c, x_a, x_f = rnd(T, C), rnd(T, A), rnd(T, Fd)  # inputs
    W_a, W_o, W_up, W_down, W_r, W_head = rnd(A, C), rnd(C, A), rnd(Fd, C), rnd(C, Fd), rnd(C, C), rnd(V, C)
    o_a, o_c, o_f, o_v = torch.empty(T, A), torch.empty(T, C), torch.empty(T, Fd), torch.empty(T, V)

    def run():
        for _ in range(L):
            for _ in range(3):  # key, value, receptance
                torch.mm(x_c, W_a.T, out=o_a)
            torch.mm(x_a, W_o.T, out=o_c)  # output
            torch.mm(x_c, W_up.T, out=o_f)  # channel mix up
            torch.mm(x_f, W_down.T, out=o_c)  # channel mix down
            torch.mm(x_c, W_r.T, out=o_c)  # channel mix receptance
        torch.mm(x_c, W_head.T, out=o_v)  # lm head

    def run_alloc():
        for _ in range(L):
            for _ in range(3):
                torch.mm(x_c, W_a.T)
            torch.mm(x_a, W_o.T)
            torch.mm(x_c, W_up.T)
            torch.mm(x_f, W_down.T)
            torch.mm(x_c, W_r.T)
        torch.mm(x_c, W_head.T)

    return run if preallocated else run_alloc


def wkv_fns(T: int, A: int, chunks: list[int]):
    """Closures timing one layer's WKV (chunked per K, and the sequential loop)."""
    from statecast.arch.rwkv import wkv_chunked, wkv_sequential

    g = torch.Generator().manual_seed(T)
    w = torch.exp(torch.linspace(-5, 3, A))  # exp(decay) over the init schedule's range
    u = torch.randn(A, generator=g)
    # channel-major like the model's projections: [1, T, A] views of [A, T] memory
    k = (torch.randn(A, T, generator=g) * 3).T.unsqueeze(0)
    v = torch.randn(A, T, generator=g).T.unsqueeze(0)
    st = (torch.zeros(1, A), torch.zeros(1, A), torch.full((1, A), -1e38))
    fns = {f"chunked K={K}": (lambda K=K: wkv_chunked(w, u, k, v, *st, chunk=K)) for K in chunks}
    fns["sequential loop"] = lambda: wkv_sequential(w, u, k, v, *st)
    return fns


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--no-transformers", action="store_true", help="skip the (slow) transformers timing")
    p.add_argument("--wkv-chunks", default=None, help="chunk lengths K for the WKV-alone timing (default: 16,32,64)")
    args = p.parse_args()
    threads = set_threads(args.threads)
    seqs = [128, 256] if args.quick else [1024, 2048]
    repeats = args.repeats or (2 if args.quick else 5)
    dims = dict(RWKV_169M)
    if args.quick:
        dims.update(n_layer=4)

    ours, hf = rwkv_pair(seed=0, **dims)
    C, A, Fd, V, L = dims["d_model"], dims["d_attn"], dims["d_ffn"], dims["vocab_size"], dims["n_layer"]

    from statecast.arch.rwkv import WKV_CHUNK

    chunks = [int(c) for c in (args.wkv_chunks or "16,32,64").split(",")]
    rows, results, wkv_rows = [], [], []
    with torch.inference_mode():
        for T in seqs:
            ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(T))
            # floor and statecast alternate, so both see the same machine load
            fl_sc = time_interleaved(
                {
                    "floor": gemm_floor_fn(T, C, A, Fd, V, L),
                    "floor_alloc": gemm_floor_fn(T, C, A, Fd, V, L, preallocated=False),
                    "sc": lambda: ours(ids),
                },
                repeats,
            )
            floor, floor_alloc, sc = fl_sc["floor"], fl_sc["floor_alloc"], fl_sc["sc"]
            tr = None
            if not args.no_transformers:
                tr = time_fn(lambda: hf(ids, use_cache=True), repeats=max(1, repeats - 2))
                diff = (ours(ids)[0] - hf(ids).logits).abs().max().item()
            res = {
                "T": T,
                "floor_s": floor,
                "floor_alloc_s": floor_alloc,
                "statecast_s": sc,
                "transformers_s": tr,
                "statecast_over_floor": sc.best / floor.best,
                "statecast_over_floor_alloc": sc.best / floor_alloc.best,
                "transformers_over_floor": tr.best / floor.best if tr else None,
                "transformers_over_statecast": tr.best / sc.best if tr else None,
                "max_abs_logit_diff": diff if tr else None,
            }
            wkv = {}
            for name, fn in wkv_fns(T, A, chunks).items():
                t = time_fn(fn, repeats=2 * repeats if "chunked" in name else 1)
                wkv[name] = {"one_layer": t, "all_layers_s": t.best * L}
            res["wkv_alone"] = wkv
            wkv_rows += [
                [T, name, d["one_layer"].best * 1e3, d["all_layers_s"], d["all_layers_s"] / sc.best]
                for name, d in wkv.items()
            ]
            results.append(res)
            rows.append(
                [
                    T,
                    floor.best,
                    floor_alloc.best,
                    sc.best,
                    sc.median,
                    tr.best if tr else "-",
                    res["statecast_over_floor"],
                    res["statecast_over_floor_alloc"],
                    res["transformers_over_floor"] or "-",
                    res["transformers_over_statecast"] or "-",
                    sum(t.contended for t in (floor, floor_alloc, sc) + ((tr,) if tr else ())),
                ]
            )

    out = {
        "bench": "prefill",
        "wkv_chunk": WKV_CHUNK,
        "model": {**dims, "dtype": "float32", "batch": 1, "weights": "random (statecast init), same in both"},
        "threads": threads,
        "env": environment(),
        "results": results,
    }
    if args.json:
        emit(out, True)
        return
    print_table(
        f"RWKV-4 prefill, {L} layers C={C} A={A} F={Fd} V={V}, fp32, batch 1, {threads} threads (seconds, best of {repeats}; transformers best of {max(1, repeats - 2)})",
        [
            "T",
            "GEMM floor",
            "floor alloc",
            "statecast",
            "sc median",
            "transformers",
            "sc/floor",
            "sc/floor alloc",
            "tf/floor",
            "tf/sc",
            "contended",
        ],
        rows,
        notes=[
            "weights: random statecast init, copied into transformers' RwkvForCausalLM (rescale_every=0)",
            "max |logit diff| statecast vs transformers: "
            + (", ".join(f"T={r['T']}: {r['max_abs_logit_diff']:.2e}" for r in results if r["max_abs_logit_diff"] is not None) or "not run"),
            "GEMM floor: outputs preallocated (ratios use it); floor alloc: same GEMMs allocating their outputs",
            "floor, floor alloc and statecast are timed in alternation; "
            "contended = samples during which other processes used >10% of the CPUs (retried)",
            f"{environment()['processor']}, torch {torch.__version__}",
        ],
    )
    print_table(
        f"WKV alone, one layer's shape (A={A}, batch 1) x {L} layers; the model uses K={WKV_CHUNK}",
        ["T", "variant", "ms/layer", f"x{L} layers (s)", "share of statecast forward"],
        wkv_rows,
    )


if __name__ == "__main__":
    main()
