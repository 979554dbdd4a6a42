"""One-token-at-a-time decode speed of statecast's models against transformers and the
weight-streaming floor.

    .venv/bin/python bench/bench_decode.py [--model rwkv-169m|mamba-130m|gpt2-small|llama-small]
                                           [--quick] [--json] [--threads N]

Random weights of the named shape (``common.SHAPES``), float32, batch 1. Measured in one run:
  statecast     prefill a short prompt with Model.forward, then ``steps`` greedy
                Model.step calls (argmax fed back, state carried): ms/token over the steps
  transformers  its class's generate (greedy, use_cache, same weights):
                (time(max_new_tokens=steps+1) - time(max_new_tokens=1)) / steps,
                so the prompt and the first token cancel out
  floor         bytes of weights one token must read (every matrix incl. the lm head,
                the embedding rows, and the small vectors; not the KV cache, which is
                small at these lengths) / matrix-vector bandwidth,
                measured here by timing fp32 matvecs of the lm head shape alone
  matvec floor  (for reference) one token's matvecs, same shapes, timed alone
No wall-clock threshold is asserted; ratios come from the same run.
"""

from __future__ import annotations

import torch
from common import (
    SHAPES,
    base_args,
    emit,
    environment,
    generate_ms_per_token,
    hf_generate_fn,
    matvec_bandwidth_fn,
    model_pair,
    print_table,
    set_threads,
    time_interleaved,
    weight_bytes_per_token,
)


def matvec_floor_fn(model):
    """One token's matrix-vector products with the model's shapes, timed alone."""
    mats = [p.detach() for n, p in model.named_parameters() if p.dim() == 2 and not n.endswith("embed.weight")]
    if model.lm_head is None:
        mats.append(model.embed.weight.detach())
    xs = [torch.randn(1, W.shape[1]) for W in mats]
    outs = [torch.empty(1, W.shape[0]) for W in mats]

    def run():
        for W, x, o in zip(mats, xs, outs):
            torch.mm(x, W.T, out=o)

    return run


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(SHAPES), default="rwkv-169m", help="benchmark shape (default rwkv-169m)")
    p.add_argument("--steps", type=int, default=None, help="decode steps timed (default 64, quick 16)")
    p.add_argument("--prompt", type=int, default=16, help="prompt length")
    args = p.parse_args()
    threads = set_threads(args.threads)
    steps = args.steps or (16 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 5)
    _, dims, _ = SHAPES[args.model]
    dims = {**dims, **({"n_layer": 4} if args.quick else {})}
    ours, hf = model_pair(args.model, seed=0, **dims)
    C, V = dims["d_model"], dims["vocab_size"]
    prompt = torch.randint(0, V, (1, args.prompt), generator=torch.Generator().manual_seed(1))

    with torch.inference_mode():
        # statecast: prefill, then greedy steps
        logits0, state0 = ours(prompt)
        first = logits0[:, -1].argmax(-1)  # [1] the first generated token
        tokens_sc: list[int] = []

        def decode():
            tok, st = first, state0
            tokens_sc[:] = [int(first)]
            for _ in range(steps):
                logits, st = ours.step(tok, st)
                tok = logits.argmax(-1)
                tokens_sc.append(int(tok))

        # statecast and the floors alternate, so all see the same machine load
        bw_fn, bw_bytes = matvec_bandwidth_fn(V, C)
        t = time_interleaved({"sc": decode, "bw": bw_fn, "mv": matvec_floor_fn(ours)}, repeats)
        sc, bw_t, mv = t["sc"], t["bw"], t["mv"]
        sc_ms = sc.best / steps * 1e3
        nbytes = weight_bytes_per_token(ours)
        bw = bw_bytes / bw_t.best
        floor_ms = nbytes / bw * 1e3
        mv_ms = mv.best * 1e3

        # transformers generate, greedy
        generate = hf_generate_fn(hf, prompt)
        tg = time_interleaved({"one": lambda: generate(1), "all": lambda: generate(steps + 1)}, max(2, repeats - 2))
        t_one, t_all = tg["one"], tg["all"]
        tf_ms = generate_ms_per_token(t_one, t_all, steps)
        # same greedy continuation? (tokens_sc holds the first token and `steps` more)
        hf_tokens = generate(steps + 1)[0, args.prompt :].tolist()
        agree = sum(a == b for a, b in zip(hf_tokens, tokens_sc))

    result = {
        "bench": "decode",
        "shape": args.model,
        "model": {**dims, "dtype": "float32", "batch": 1, "weights": "random (statecast init), same in both"},
        "threads": threads,
        "steps": steps,
        "prompt": args.prompt,
        "weight_bytes_per_token": nbytes,
        "matvec_bandwidth_GBps": bw / 1e9,
        "floor_ms_per_token": floor_ms,
        "matvec_floor_ms_per_token": mv_ms,
        "statecast_ms_per_token": sc_ms,
        "statecast_timing": sc,
        "transformers_ms_per_token": tf_ms,
        "transformers_timing": {"gen_1": t_one, f"gen_{steps + 1}": t_all},
        "statecast_over_floor": sc_ms / floor_ms,
        "statecast_over_matvec_floor": sc_ms / mv_ms,
        "transformers_over_statecast": tf_ms / sc_ms,
        "greedy_tokens_agreeing": f"{agree}/{steps + 1}",
        "env": environment(),
    }
    if args.json:
        emit(result, True)
        return
    print_table(
        f"{args.model} decode, {dims['n_layer']} layers C={C} V={V}, fp32, batch 1, {threads} threads, "
        f"{steps} steps after a {args.prompt}-token prompt (ms/token, best of {repeats})",
        ["what", "ms/token", "vs floor", "note"],
        [
            ["floor (bytes/bandwidth)", floor_ms, 1.0, f"{nbytes / 1e6:.1f} MB/token at {bw / 1e9:.1f} GB/s"],
            ["matvec floor", mv_ms, mv_ms / floor_ms, "same matvecs timed alone"],
            ["statecast step", sc_ms, sc_ms / floor_ms, f"median {sc.median / steps * 1e3:.2f}"],
            ["transformers generate", tf_ms, tf_ms / floor_ms, f"tf/statecast {tf_ms / sc_ms:.2f}"],
        ],
        notes=[
            f"weights: random statecast init, copied into transformers' {type(hf).__name__}",
            f"statecast/floor {sc_ms / floor_ms:.2f}, statecast/matvec-floor {sc_ms / mv_ms:.2f}, "
            f"transformers/statecast {tf_ms / sc_ms:.2f}; greedy tokens equal to transformers': {agree}/{steps + 1}",
            "contended samples (other processes busy, retried): "
            f"{sum(t.contended for t in (sc, bw_t, mv, t_one, t_all))}",
            f"{environment()['processor']}, torch {torch.__version__}",
        ],
    )


if __name__ == "__main__":
    main()
