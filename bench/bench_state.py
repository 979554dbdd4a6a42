"""Decode-state memory and per-token latency against context length: each hybrid (Jamba,
Zamba2) vs the pure Transformer of the same width and depth.

    .venv/bin/python bench/bench_state.py [--quick] [--json] [--threads N]
                                          [--contexts 1024,8192,32768,131072]

Pairs (random weights, float32, batch 1), from ``common.SHAPES``:
  * "jamba-small" (16 layers, attention on 2 of them, Jamba's 1-in-8) vs "llama-16l" (16
    attention layers, same width, heads and GQA);
  * "zamba2-small" (24 Mamba-2 layers, one shared attention block used at 4 of them, each
    use with its own KV) vs "llama-24l-1024" (24 attention layers of the same width).
For each context P, in one run:
  state bytes   one real decode step is taken from a history of P-1 positions (a zero
                state of that length), and the bytes of every tensor in the state the
                model RETURNS are summed: what statecast allocates to carry P positions.
                The formula (KV: 2 x KV rows x Hkv x P x D x 4 B, plus the recurrent
                state of the empty history, which must not grow) must agree.
  ms/token      median of timed ``Model.step`` calls from that history (the step reads
                the whole KV history and writes the grown one).
A context whose history plus grown copy would pass ``--max-state-gib`` (8 GiB by default;
the 128K Transformer needs 24 GiB for its history alone) is reported by the formula only.
No wall-clock threshold is asserted; the claim under test is the ratio of state bytes.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from common import SHAPES, base_args, emit, environment, print_table, set_threads, time_fn

from statecast.families import FAMILIES

PAIRS = (("jamba-small", "llama-16l"), ("zamba2-small", "llama-24l-1024"))


def build(shape: str):
    family, dims, _ = SHAPES[shape]
    cfg_cls, model_cls = FAMILIES[family].model_classes()
    model = model_cls(cfg_cls.from_unified(dims))
    model.reset_parameters(generator=torch.Generator().manual_seed(0))
    return model.eval()


def history(model, past: int):
    """The model's own empty state, its KV stacks ([L, B, Hkv, P, D]) grown to ``past`` positions (zeros)."""
    state = model.init_state(1)
    grown = []
    for f, t in zip(state._fields, state):
        if f in ("key", "value"):
            shape = list(t.shape)
            shape[3] = past
            t = torch.zeros(shape, dtype=t.dtype)
        grown.append(t)
    return type(state)(*grown)


def formula_bytes(model, P: int) -> int:
    """KV: 2 (key, value) x KV rows (attention layers, or uses of a shared block) x Hkv x P x
    D x 4 B; everything else (conv, SSM) as in the empty history, independent of P."""
    cfg = model.cfg
    empty = model.init_state(1)
    kv_rows = len(model.state_layers().get("key", ()))
    recurrent = sum(t.numel() * t.element_size() for f, t in zip(empty._fields, empty) if f not in ("key", "value"))
    return 2 * kv_rows * cfg.n_kv_head * P * cfg.head_dim * 4 + recurrent


@torch.inference_mode()
def measure(model, P: int, repeats: int, budget: int) -> dict:
    formula = formula_bytes(model, P)
    if 2 * formula > budget:  # a step holds the history and the grown copy
        return {"context": P, "state_bytes": None, "formula_bytes": formula, "ms_per_token": None, "timing": None}
    past = history(model, P - 1)
    token = torch.zeros(1, dtype=torch.long)
    _, state = model.step(token, past)
    measured = sum(t.numel() * t.element_size() for t in state)
    del state
    timing = time_fn(lambda: model.step(token, past), repeats=repeats, warmup=1)
    return {"context": P, "state_bytes": measured, "formula_bytes": formula,
            "ms_per_token": timing.median * 1e3, "timing": timing}


def main() -> None:
    p = base_args(__doc__.split("\n\n")[0])
    p.add_argument("--max-state-gib", type=float, default=8.0,
                   help="above this (history + grown copy), a context's state is given by the formula only, "
                        "not allocated or timed (default 8)")
    p.add_argument("--contexts", default=None,
                   help="comma-separated context lengths (default 1024,8192,32768,131072; quick 1024,4096)")
    args = p.parse_args()
    threads = set_threads(args.threads)
    contexts = [int(c) for c in (args.contexts or ("1024,4096" if args.quick else "1024,8192,32768,131072")).split(",")]
    repeats = args.repeats or (2 if args.quick else 3)
    # --json: stdout carries the JSON alone (run_all.py parses it); progress and table go to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        results = run(contexts, repeats, threads, int(args.max_state_gib * 2**30))
    emit({"bench": "state", "threads": threads, "pairs": [list(p) for p in PAIRS], "environment": environment(), "results": results}, args.json)


def run(contexts: list[int], repeats: int, threads: int, budget: int) -> dict:
    results = {}
    for shape in dict.fromkeys(s for pair in PAIRS for s in pair):
        model = build(shape)
        n_params = sum(p.numel() for p in model.parameters())
        results[shape] = {"n_params": n_params, "contexts": []}
        for P in contexts:
            r = measure(model, P, repeats, budget)
            if r["state_bytes"] is None:
                print(f"  {shape:14s} P={P:>6}: state {r['formula_bytes'] / 2**20:9.1f} MiB by the formula "
                      f"(over --max-state-gib: not allocated)", flush=True)
                results[shape]["contexts"].append(r)
                continue
            if r["state_bytes"] != r["formula_bytes"]:
                raise SystemExit(f"{shape} P={P}: measured {r['state_bytes']} B, formula {r['formula_bytes']} B")
            results[shape]["contexts"].append(r)
            print(f"  {shape:14s} P={P:>6}: state {r['state_bytes'] / 2**20:9.1f} MiB, {r['ms_per_token']:8.1f} ms/token",
                  flush=True)
        del model
    for hybrid, dense in PAIRS:
        rows = []
        for h, t in zip(results[hybrid]["contexts"], results[dense]["contexts"]):
            hb, tb = h["formula_bytes"], t["formula_bytes"]
            rows.append([h["context"], hb / 2**20, tb / 2**20, tb / hb, h["ms_per_token"] or float("nan"),
                         t["ms_per_token"] or float("nan")])
        print_table(
            f"decode state and step time, {hybrid} vs {dense}, batch 1, fp32, {threads} threads",
            ["context", f"{hybrid} MiB", f"{dense} MiB", "ratio", f"{hybrid} ms/tok", f"{dense} ms/tok"],
            rows,
            notes=[f"{hybrid} {results[hybrid]['n_params'] / 1e6:.0f}M params, {dense} {results[dense]['n_params'] / 1e6:.0f}M",
                   "state bytes: the tensors a real step returned, equal to the formula; a row without "
                   "ms/token (nan) is over --max-state-gib and given by the formula alone"],
        )
    return results


if __name__ == "__main__":
    main()
