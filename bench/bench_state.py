"""Decode-state memory and per-token latency against context length: Jamba vs the pure
Transformer of the same width and depth.

    .venv/bin/python bench/bench_state.py [--quick] [--json] [--threads N]
                                          [--contexts 1024,8192,32768,131072]

Models: random weights of ``common.SHAPES["jamba-small"]`` (16 layers, attention on 2 of
them, Jamba's 1-in-8) and ``["llama-16l"]`` (16 attention layers, same width, heads and
GQA), float32, batch 1. For each context P, in one run:
  state bytes   one real decode step is taken from a history of P-1 positions (a zero
                state of that length), and the bytes of every tensor in the state the
                model RETURNS are summed: what statecast allocates to carry P positions.
                The formula (KV: 2 x attention layers x Hkv x P x D x 4 B; Mamba: conv
                and ssm per Mamba layer) is printed beside it and must agree.
  ms/token      median of timed ``Model.step`` calls from that history (the step reads
                the whole KV history and writes the grown one).
No wall-clock threshold is asserted; the claim under test is the ratio of state bytes.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from common import SHAPES, base_args, emit, environment, print_table, set_threads, time_fn

from statecast.families import FAMILIES

MODELS = ("jamba-small", "llama-16l")


def build(shape: str):
    family, dims, _ = SHAPES[shape]
    cfg_cls, model_cls = FAMILIES[family].model_classes()
    model = model_cls(cfg_cls.from_unified(dims))
    model.reset_parameters(generator=torch.Generator().manual_seed(0))
    return model.eval()


def history(model, past: int):
    """The model's own empty state, its KV stacks grown to ``past`` positions (zeros)."""
    state = model.init_state(1)
    grown = []
    for t in state:
        if t.dim() == 5:  # [L, B, Hkv, P, D]
            shape = list(t.shape)
            shape[3] = past
            t = torch.zeros(shape, dtype=t.dtype)
        grown.append(t)
    return type(state)(*grown)


def formula_bytes(model, P: int) -> int:
    cfg = model.cfg
    kinds = getattr(cfg, "layer_kinds", ("attention",) * cfg.n_layer)
    n_attn, n_mamba = kinds.count("attention"), kinds.count("mamba")
    kv = 2 * n_attn * cfg.n_kv_head * P * cfg.head_dim * 4
    mamba = n_mamba * (cfg.d_inner * (cfg.d_conv - 1) + cfg.d_inner * cfg.d_state) * 4 if n_mamba else 0
    return kv + mamba


@torch.inference_mode()
def measure(model, P: int, repeats: int) -> dict:
    past = history(model, P - 1)
    token = torch.zeros(1, dtype=torch.long)
    _, state = model.step(token, past)
    measured = sum(t.numel() * t.element_size() for t in state)
    del state
    timing = time_fn(lambda: model.step(token, past), repeats=repeats, warmup=1)
    return {"context": P, "state_bytes": measured, "formula_bytes": formula_bytes(model, P),
            "ms_per_token": timing.median * 1e3, "timing": timing}


def main() -> None:
    p = base_args(__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default=None,
                   help="comma-separated context lengths (default 1024,8192,32768,131072; quick 1024,4096)")
    args = p.parse_args()
    threads = set_threads(args.threads)
    contexts = [int(c) for c in (args.contexts or ("1024,4096" if args.quick else "1024,8192,32768,131072")).split(",")]
    repeats = args.repeats or (2 if args.quick else 3)
    # --json: stdout carries the JSON alone (run_all.py parses it); progress and table go to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        results = run(contexts, repeats, threads)
    emit({"bench": "state", "threads": threads, "environment": environment(), "results": results}, args.json)


def run(contexts: list[int], repeats: int, threads: int) -> dict:
    rows, results = [], {}
    for shape in MODELS:
        model = build(shape)
        n_params = sum(p.numel() for p in model.parameters())
        results[shape] = {"n_params": n_params, "contexts": []}
        for P in contexts:
            r = measure(model, P, repeats)
            if r["state_bytes"] != r["formula_bytes"]:
                raise SystemExit(f"{shape} P={P}: measured {r['state_bytes']} B, formula {r['formula_bytes']} B")
            results[shape]["contexts"].append(r)
            print(f"  {shape:12s} P={P:>6}: state {r['state_bytes'] / 2**20:9.1f} MiB, {r['ms_per_token']:8.1f} ms/token",
                  flush=True)
        del model
    for i, P in enumerate(contexts):
        j, t = results["jamba-small"]["contexts"][i], results["llama-16l"]["contexts"][i]
        rows.append([P, j["state_bytes"] / 2**20, t["state_bytes"] / 2**20, t["state_bytes"] / j["state_bytes"],
                     j["ms_per_token"], t["ms_per_token"]])
    print_table(
        f"decode state and step time, batch 1, fp32, {threads} threads",
        ["context", "jamba MiB", "transformer MiB", "transformer/jamba", "jamba ms/tok", "transformer ms/tok"],
        rows,
        notes=[f"jamba-small {results['jamba-small']['n_params'] / 1e6:.0f}M params (4 experts, top-2 on 8 layers), "
               f"llama-16l {results['llama-16l']['n_params'] / 1e6:.0f}M",
               "state bytes: the tensors a real step returned; equal to the formula in every row"],
    )
    return results


if __name__ == "__main__":
    main()
