"""Mamba-2: whole-sequence (prefill) speed against the GEMM floor and transformers, the SSD
algorithms and chunk lengths, and the decode step's cost at a short and a long position.

    .venv/bin/python bench/bench_mamba2.py [--quick] [--json] [--threads N] [--repeats N]
                                           [--seqs 1024,4096] [--chunks 32,64,128,256] [--no-transformers]

Random weights (statecast's init, transformers' Mamba2 init) of the state-spaces
mamba2-130m shape: 24 layers x 768, 24 heads x 64 (d_inner 1536), d_state 128, 1 group,
conv 4, vocab 50280, tied head; float32, batch 1 (--quick: 4 layers, shorter sequences).
Measured in one run, under torch.inference_mode():
  statecast      Mamba2.forward (by segments of ``arch.mamba2.SSD_SEGMENT`` tokens, in_proj to
                 out_proj; chunked SSD, ``SSD_CHUNK`` tokens per chunk)
  transformers   Mamba2ForCausalLM(use_cache=False) holding the same weights: its CPU path
                 (``mamba2_chunk_scan`` at the config's chunk_size 256)
  GEMM floor     the forward's matrix products alone, on preallocated random tensors into
                 preallocated outputs (torch.bmm ..., out=): in_proj, out_proj, the head, and
                 the SSD's chunk products at the model's chunk length (C B^T per group, the
                 masked [Q, Q] x [Q, P] product per head, C h^T and (dt x)^T B per group)
  SSD alone      one layer's SSD (``ssd_chunked``, by the model's segments) per chunk length
                 in --chunks, and the token-by-token recurrence (``ssd_sequential``), times L
  decode         ms per Mamba2.step token after a state of 64 and of 8192 tokens (--quick:
                 1024), against the weight-streaming floor (bytes of weights per token /
                 measured matrix-vector bandwidth, as bench_decode.py)
Ratios are of best times from the same run. No wall-clock threshold is asserted.
"""

from __future__ import annotations

import math

import torch
from common import (
    base_args,
    emit,
    environment,
    gemm_floor_fn,
    matvec_bandwidth_fn,
    print_table,
    set_threads,
    time_fn,
    time_interleaved,
    weight_bytes_per_token,
)

SHAPE = dict(vocab_size=50280, d_model=768, n_layer=24, n_heads=24, head_dim=64, d_state=128, n_groups=1, d_conv=4,
             chunk_size=256, tie_embeddings=True)


def make_models(dims: dict, transformers: bool):
    """(ours, transformers' Mamba2ForCausalLM with the same weights or None)."""
    from statecast.arch.mamba2 import Mamba2, Mamba2Config
    from statecast.families.mamba2 import HF, hf_config
    from statecast.families.tables import from_canonical_state

    ours = Mamba2(Mamba2Config(**dims)).eval()
    ours.reset_parameters(torch.Generator().manual_seed(0))
    if not transformers:
        return ours, None
    from transformers import Mamba2Config as HfConfig
    from transformers import Mamba2ForCausalLM, PreTrainedConfig

    hf_cfg = PreTrainedConfig._decode_special_floats(hf_config(ours.cfg.to_unified()))
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")}
    hf = Mamba2ForCausalLM(HfConfig(**hf_cfg)).eval()
    state = from_canonical_state(HF, ours.state_dict())
    state["lm_head.weight"] = state["backbone.embeddings.weight"]
    hf.load_state_dict(state, strict=True)
    return ours, hf


def ssd_shapes(cfg, T: int, Q: int) -> list[tuple[str, int, int, int, int]]:
    """The SSD's matrix products over T tokens in chunks of Q (batch 1): (what, batch, m, k, n)."""
    H, P, N, G = cfg.n_heads, cfg.head_dim, cfg.d_state, cfg.n_groups
    R, c = H // G, math.ceil(T / Q)
    one = [("C B^T", c * G, Q, N, Q), ("masked x dt x", c * H, Q, Q, P), ("C h^T", c * G, Q, N, R * P),
           ("(dt x)^T B", c * G, R * P, Q, N)]
    return [(f"layers.{i} {what}", *dims) for i in range(cfg.n_layer) for what, *dims in one]


def floor_fn(model, T: int, Q: int):
    """A closure running the forward's products (projections, head, SSD chunk products) alone."""
    return gemm_floor_fn(model, T, extra=ssd_shapes(model.cfg, T, Q))


def ssd_fns(cfg, T: int, chunks: list[int], sequential: bool):
    """One layer's SSD per chunk length (and the token loop): closures."""
    from statecast.arch.mamba2 import ssd_chunked, ssd_sequential

    g = torch.Generator().manual_seed(T)
    H, P, N, G = cfg.n_heads, cfg.head_dim, cfg.d_state, cfg.n_groups
    x = torch.randn(1, T, H, P, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(1, T, H, generator=g) - 3)
    A = -torch.arange(1.0, H + 1)  # the init schedule's decays
    Bm, Cm = torch.randn(1, T, G, N, generator=g), torch.randn(1, T, G, N, generator=g)
    h = torch.zeros(1, H, P, N)
    fns = {f"chunked Q={Q}": (lambda Q=Q: ssd_chunked(x, dt, A, Bm, Cm, h, Q)) for Q in chunks}
    if sequential:
        fns["recurrence (token loop)"] = lambda: ssd_sequential(x, dt, A, Bm, Cm, h)
    return fns


def main() -> None:
    from statecast.arch.mamba2 import SSD_CHUNK, SSD_SEGMENT

    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--seqs", default=None, help="prompt lengths (default 1024,4096; quick 128,256)")
    p.add_argument("--chunks", default="32,64,128,256", help="SSD chunk lengths compared alone")
    p.add_argument("--steps", type=int, default=None, help="decode steps timed per position (default 32; quick 8)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' (slow) forward")
    args = p.parse_args()
    threads = set_threads(args.threads)
    seqs = [int(t) for t in args.seqs.split(",")] if args.seqs else ([128, 256] if args.quick else [1024, 4096])
    chunks = [int(c) for c in args.chunks.split(",")]
    repeats = args.repeats or (2 if args.quick else 3)
    steps = args.steps or (8 if args.quick else 32)
    positions = [64, 1024] if args.quick else [64, 8192]
    dims = {**SHAPE, **({"n_layer": 4} if args.quick else {})}
    ours, hf = make_models(dims, not args.no_transformers)
    cfg, L, V = ours.cfg, dims["n_layer"], dims["vocab_size"]
    Q = min(cfg.chunk_size, SSD_CHUNK)
    prefill, rows, ssd_rows = [], [], []
    with torch.inference_mode():
        for T in seqs:
            ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(T))
            t = time_interleaved({"floor": floor_fn(ours, T, Q), "sc": lambda: ours(ids)}, repeats)
            tr = diff = None
            if hf is not None:
                tr = time_fn(lambda: hf(ids, use_cache=False), repeats=1)
                diff = (ours(ids)[0] - hf(ids, use_cache=False).logits).abs().max().item()
            ssd = {name: time_fn(fn, repeats=repeats) for name, fn in ssd_fns(cfg, T, chunks, T <= 1024).items()}
            res = {"T": T, "floor_s": t["floor"], "statecast_s": t["sc"], "transformers_s": tr,
                   "statecast_over_floor": t["sc"].best / t["floor"].best,
                   "transformers_over_floor": tr.best / t["floor"].best if tr else None,
                   "max_abs_logit_diff": diff,
                   "ssd_alone": {k: {"one_layer": v, "all_layers_s": v.best * L} for k, v in ssd.items()}}
            prefill.append(res)
            rows.append([T, t["floor"].best, t["sc"].best, t["sc"].median, tr.best if tr else "-",
                         res["statecast_over_floor"], res["transformers_over_floor"] or "-",
                         sum(x.contended for x in (t["floor"], t["sc"]) + ((tr,) if tr else ()))])
            ssd_rows += [[T, name, v.best * 1e3, v.best * L, v.best * L / t["sc"].best] for name, v in ssd.items()]

        # decode: the same steps from a short and a long history (a recurrent step must not grow)
        states = {}
        for pos in positions:
            ids = torch.randint(0, V, (1, pos), generator=torch.Generator().manual_seed(pos))
            states[pos] = ours(ids)[1]
        tok0 = torch.tensor([1])

        def decode(pos):
            def run():
                tok, st = tok0, states[pos]
                for _ in range(steps):
                    logits, st = ours.step(tok, st)
                    tok = logits.argmax(-1)
            return run

        bw_fn, bw_bytes = matvec_bandwidth_fn(V, dims["d_model"])
        td = time_interleaved({**{f"pos {p}": decode(p) for p in positions}, "bw": bw_fn}, repeats + 2)
        nbytes = weight_bytes_per_token(ours)
        bw = bw_bytes / td["bw"].best
        floor_ms = nbytes / bw * 1e3
        dec = {p: td[f"pos {p}"].best / steps * 1e3 for p in positions}

    out = {
        "bench": "mamba2",
        "model": {**dims, "dtype": "float32", "batch": 1, "weights": "random (statecast init), same in both"},
        "threads": threads,
        "ssd_chunk": Q,
        "ssd_segment": SSD_SEGMENT,
        "prefill": prefill,
        "decode": {"steps": steps, "positions": positions, "ms_per_token": dec,
                   "timings": {p: td[f"pos {p}"] for p in positions},
                   "long_over_short": dec[positions[-1]] / dec[positions[0]],
                   "weight_bytes_per_token": nbytes, "matvec_bandwidth_GBps": bw / 1e9,
                   "floor_ms_per_token": floor_ms,
                   "over_floor": {p: dec[p] / floor_ms for p in positions}},
        "env": environment(),
    }
    if args.json:
        emit(out, True)
        return
    print_table(f"Mamba-2 prefill ({L} layers x {dims['d_model']}, H={cfg.n_heads} P={cfg.head_dim} N={cfg.d_state}), "
                f"fp32, batch 1, {threads} threads (seconds, best of {repeats}; transformers once)",
                ["T", "GEMM floor", "statecast", "sc median", "transformers", "sc/floor", "tf/floor", "contended"], rows,
                notes=[f"statecast SSD chunk Q={Q}, segment {SSD_SEGMENT} tokens; "
                       f"floor = projections + head + SSD chunk products at Q={Q}",
                       "max |logit diff| vs transformers: " + ", ".join(
                           f"T={r['T']}: {r['max_abs_logit_diff']:.2e}" for r in prefill if r["max_abs_logit_diff"] is not None),
                       f"{environment()['processor']}, torch {torch.__version__}"])
    print_table(f"SSD alone, one layer (ms) x {L} layers; the model uses Q={Q}",
                ["T", "algorithm", "ms/layer", f"x{L} (s)", "share of statecast forward"], ssd_rows)
    print_table(f"Mamba-2 decode, ms/token over {steps} steps (best of {repeats + 2})",
                ["position", "ms/token", "vs floor"],
                [[p, dec[p], dec[p] / floor_ms] for p in positions]
                + [["floor", floor_ms, 1.0]],
                notes=[f"floor: {nbytes / 1e6:.1f} MB of weights per token at {bw / 1e9:.1f} GB/s (matvec)",
                       f"step at {positions[-1]} / step at {positions[0]}: {dec[positions[-1]] / dec[positions[0]]:.3f}"])


if __name__ == "__main__":
    main()
