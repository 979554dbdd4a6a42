"""Whole-sequence (prefill) speed of statecast's models against transformers and the GEMM floor.

    .venv/bin/python bench/bench_prefill.py [--model rwkv-169m|mamba-130m|gpt2-small|llama-small]
                                            [--quick] [--json] [--threads N]

Random weights of the named shape (``common.SHAPES``), float32, batch 1. Measured in
one run, all under torch.inference_mode():
  statecast     Model.forward with the default settings (RWKV: chunked WKV; Mamba: the
                whole-sequence scan that ``--kernels auto`` picks, the compiled C++ kernel
                where it builds and passes its self-check, else the pure-PyTorch scan, named
                in the output; Transformer: one causal attention call per layer); for Mamba
                with the compiled kernel, the pure path too ("statecast, pure"), same run
  transformers  the transformers class of the shape (RwkvForCausalLM with
                rescale_every=0, MambaForCausalLM, GPT2LMHeadModel, LlamaForCausalLM)
                holding the same weights as statecast's model
  GEMM floor    only the model's matrix products (``common.gemm_shapes``: every weight
                matrix as a [T, in] x [in, out] product, the head, and for attention
                q k^T and scores x v per head, computed in full), on preallocated random
                tensors into preallocated outputs. The ratios use this strict floor;
                "floor alloc" (same products, outputs allocated) is printed alongside
  WKV alone     (RWKV only) the whole-sequence WKV of one layer's shape, times L: the
                chunked form for each chunk length in --wkv-chunks, and the float32 loop
                over T (``wkv_sequential``, the algorithm transformers runs on CPU)
Ratios are of best times (medians are printed too). No wall-clock threshold is asserted.
"""

from __future__ import annotations

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
    p.add_argument("--model", choices=list(SHAPES), default="rwkv-169m", help="benchmark shape (default rwkv-169m)")
    p.add_argument("--no-transformers", action="store_true", help="skip the (slow) transformers timing")
    p.add_argument("--wkv-chunks", default=None, help="RWKV: chunk lengths K for the WKV-alone timing (default: 16,32,64)")
    p.add_argument("--seqs", default=None, help="comma-separated prompt lengths (default 1024,2048; quick 128,256)")
    args = p.parse_args()
    threads = set_threads(args.threads)
    seqs = [int(t) for t in args.seqs.split(",")] if args.seqs else ([128, 256] if args.quick else [1024, 2048])
    repeats = args.repeats or (2 if args.quick else 5)
    family, dims, _ = SHAPES[args.model]
    dims = {**dims, **({"n_layer": 4} if args.quick else {})}
    ours, hf = model_pair(args.model, seed=0, **dims)
    # the default settings: what load_model / verify / generate / the CLI run (--kernels auto)
    kernels = ours.set_kernels("auto") if hasattr(ours, "set_kernels") else "torch"
    V, L = dims["vocab_size"], dims["n_layer"]
    chunks = [int(c) for c in (args.wkv_chunks or "16,32,64").split(",")]
    rows, results, wkv_rows = [], [], []
    with torch.inference_mode():
        for T in seqs:
            ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(T))
            # floor and statecast alternate, so both see the same machine load
            def run_with(impl):
                def run():
                    ours.set_kernels(impl)
                    return ours(ids)

                return run

            fns = {
                "floor": gemm_floor_fn(ours, T),
                "floor_alloc": gemm_floor_fn(ours, T, preallocated=False),
                "sc": run_with("auto") if kernels != "torch" else (lambda: ours(ids)),
            }
            if kernels == "compiled":
                fns["sc_pure"] = run_with("torch")
            fl_sc = time_interleaved(fns, repeats)  # in alternation: all see the same machine load
            if kernels != "torch":
                ours.set_kernels("auto")
            floor, floor_alloc, sc = fl_sc["floor"], fl_sc["floor_alloc"], fl_sc["sc"]
            sc_pure = fl_sc.get("sc_pure")
            tr = None
            if not args.no_transformers:
                tr = time_fn(lambda: hf(ids, use_cache=False), repeats=max(1, repeats - 2))
                diff = (ours(ids)[0] - hf(ids, use_cache=False).logits).abs().max().item()
            res = {
                "T": T,
                "floor_s": floor,
                "floor_alloc_s": floor_alloc,
                "statecast_s": sc,
                "kernels": kernels,
                "statecast_pure_s": sc_pure,
                "statecast_pure_over_floor": sc_pure.best / floor.best if sc_pure else None,
                "transformers_s": tr,
                "statecast_over_floor": sc.best / floor.best,
                "statecast_over_floor_alloc": sc.best / floor_alloc.best,
                "transformers_over_floor": tr.best / floor.best if tr else None,
                "transformers_over_statecast": tr.best / sc.best if tr else None,
                "max_abs_logit_diff": diff if tr else None,
            }
            if family == "rwkv":
                A = dims["d_attn"]
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
            if sc_pure:
                rows.append([f"{T} pure", "", "", sc_pure.best, sc_pure.median, "", res["statecast_pure_over_floor"],
                             sc_pure.best / floor_alloc.best, "", "", sc_pure.contended])

    out = {
        "bench": "prefill",
        "shape": args.model,
        "model": {**dims, "dtype": "float32", "batch": 1, "weights": "random (statecast init), same in both"},
        "threads": threads,
        "env": environment(),
        "results": results,
    }
    if args.json:
        emit(out, True)
        return
    print_table(
        f"{args.model} prefill ({L} layers), fp32, batch 1, {threads} threads (seconds, best of {repeats}; "
        f"transformers best of {max(1, repeats - 2)})",
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
            f"statecast runs the default settings (--kernels auto): {kernels}"
            + ("; 'T pure' rows: the pure-PyTorch scan (--kernels torch), same run" if kernels == "compiled" else ""),
            f"weights: random statecast init, copied into transformers' {type(hf).__name__}",
            "max |logit diff| statecast vs transformers: "
            + (", ".join(f"T={r['T']}: {r['max_abs_logit_diff']:.2e}" for r in results if r["max_abs_logit_diff"] is not None) or "not run"),
            "GEMM floor: outputs preallocated (ratios use it); floor alloc: same GEMMs allocating their outputs",
            "floor, floor alloc and statecast are timed in alternation; "
            "contended = samples during which other processes used >10% of the CPUs (retried)",
            f"{environment()['processor']}, torch {torch.__version__}",
        ],
    )
    if wkv_rows:
        from statecast.arch.rwkv import WKV_CHUNK

        print_table(
            f"WKV alone, one layer's shape (A={dims['d_attn']}, batch 1) x {L} layers; the model uses K={WKV_CHUNK}",
            ["T", "variant", "ms/layer", f"x{L} layers (s)", "share of statecast forward"],
            wkv_rows,
        )


if __name__ == "__main__":
    main()
