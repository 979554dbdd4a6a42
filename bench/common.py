"""Shared helpers for the benchmark scripts: threads, timing, contention check, output.

Timing rule: warm up, then repeat; report the best and the median of the repeats.
Never compare against fixed wall-clock numbers: every script prints ratios of things
measured in the same run.

The machines these run on are often shared, so each timed sample also records how
much CPU the *other* processes used meanwhile (Linux ``/proc``; elsewhere it reads 0).
Samples taken while others used more than ``busy_limit`` of the machine are retried
(up to ``max_tries`` samples in all) and reported as contended.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/x.py` from a checkout
    sys.path.insert(0, str(REPO))


def set_threads(n: int) -> int:
    """Intra-op threads for torch (the benchmarks' setting is 2)."""
    torch.set_num_threads(n)
    return torch.get_num_threads()


def base_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats: a smoke run")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    return p


# --------------------------------------------------------------------------- contention


def _busy_ticks() -> int | None:
    """Non-idle CPU ticks of the whole machine (user+nice+system+irq+softirq+steal)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def _self_ticks() -> int | None:
    """CPU ticks of this process, all threads (utime + stime)."""
    try:
        with open("/proc/self/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(rest[11]) + int(rest[12])


def _ncpu() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    best: float  # seconds, best uncontended sample (best of all if none was uncontended)
    median: float  # seconds, median of the samples kept
    samples: list[float] = field(default_factory=list)
    contended: int = 0  # samples during which other processes were busy
    kept_contended: bool = False  # too few clean samples: contended ones were kept
    others_busy: float = 0.0  # max fraction of the machine others used during a kept sample


def time_fn(
    fn: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    busy_limit: float = 0.10,
    max_tries: int | None = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` kept samples.

    A sample during which other processes used more than ``busy_limit`` of all CPUs is
    discarded and retried, up to ``max_tries`` samples (default 3 * repeats); if too few
    clean samples come, the contended ones are kept and counted in ``Timing.contended``.
    """
    for _ in range(warmup):
        fn()
    max_tries = 3 * repeats if max_tries is None else max_tries
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    ncpu = _ncpu()
    clean: list[tuple[float, float]] = []
    dirty: list[tuple[float, float]] = []
    for _ in range(max_tries):
        b0, s0 = _busy_ticks(), _self_ticks()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        b1, s1 = _busy_ticks(), _self_ticks()
        others = 0.0
        if None not in (b0, s0, b1, s1):
            others = max(0.0, ((b1 - b0) - (s1 - s0)) / hz) / (dt * ncpu)
        (clean if others <= busy_limit else dirty).append((dt, others))
        if len(clean) >= repeats:
            break
    enough = len(clean) >= max(1, repeats // 2)
    kept = clean if enough else clean + dirty
    times = [t for t, _ in kept]
    return Timing(
        best=min(times),
        median=statistics.median(times),
        samples=times,
        contended=len(dirty),
        kept_contended=not enough,
        others_busy=max(o for _, o in kept),
    )


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, settle: float = 0.0,
                     **kw) -> dict[str, Timing]:
    """``time_fn`` for several functions in rounds (a, b, c, a, b, c, ...), so that a
    change in machine load during the run hits all of them alike; returns name -> Timing.

    settle: seconds slept (untimed) before each sample, so that the thread pools of the
    previous function (onnxruntime's and OpenMP's workers spin for a while after their
    work) are idle when the next one starts."""
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[Timing]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle:
                time.sleep(settle)
            samples[name].append(time_fn(fn, repeats=1, warmup=0, **kw))
    out = {}
    for name, ts in samples.items():
        clean = [t for t in ts if not t.kept_contended]
        kept = clean or ts
        times = [min(t.samples) for t in kept]
        out[name] = Timing(
            best=min(times),
            median=statistics.median(times),
            samples=times,
            contended=sum(t.contended for t in ts),
            kept_contended=not clean,
            others_busy=max(t.others_busy for t in kept),
        )
    return out


# --------------------------------------------------------------------------- output


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": _ncpu(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_table(title: str, headers: list[str], rows: list[list], notes: list[str] = ()) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    for n in notes:
        print(f"  note: {n}")


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2e}"
    return str(x)


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, Timing):
        return asdict(o)
    raise TypeError(type(o))


# --------------------------------------------------------------------------- models


RWKV_169M = dict(vocab_size=50277, d_model=768, n_layer=12, d_attn=768, d_ffn=3072)

# Benchmark shapes: (family, unified config, Hub model_type the transformers twin uses).
SHAPES: dict[str, tuple[str, dict, str]] = {
    "rwkv-169m": ("rwkv", RWKV_169M, "rwkv"),
    "mamba-130m": ("mamba", dict(vocab_size=50280, d_model=768, n_layer=24, d_inner=1536, d_state=16, d_conv=4,
                                 dt_rank=48), "mamba"),
    # state-spaces/mamba2-130m's shape: 24 x 768, 24 heads x 64, d_state 128, one group
    "mamba2-130m": ("mamba2", dict(vocab_size=50280, d_model=768, n_layer=24, n_heads=24, head_dim=64, d_state=128,
                                   n_groups=1, d_conv=4, chunk_size=256, tie_embeddings=True), "mamba2"),
    # GPT-2 small, with 2048 learned positions so that T=2048 fits (random weights anyway)
    "gpt2-small": ("transformer", dict(vocab_size=50257, d_model=768, n_layer=12, n_head=12, n_kv_head=12, head_dim=64,
                                       d_ffn=3072, norm="layernorm", norm_eps=1e-5, mlp="plain", act="gelu_new",
                                       positions="learned", max_positions=2048, qkv_bias=True, o_bias=True,
                                       mlp_bias=True, tie_embeddings=True), "gpt2"),
    # a small Llama: GPT-2-small width and depth, GQA 12/4, SwiGLU, untied head
    "llama-small": ("transformer", dict(vocab_size=32000, d_model=768, n_layer=12, n_head=12, n_kv_head=4, head_dim=64,
                                        d_ffn=2048, norm="rmsnorm", norm_eps=1e-5, mlp="gated", act="silu",
                                        positions="rope", max_positions=4096, rope_theta=10000.0,
                                        tie_embeddings=False), "llama"),
    # Jamba's layout at llama-small's width: 16 layers in two blocks of 8, attention on
    # layers 4 and 12 (1 of 8, as Jamba), 4 experts top-2 on every odd layer, GQA 12/4
    "jamba-small": ("jamba", dict(vocab_size=32000, d_model=768, n_layer=16,
                                  layer_kinds=["attention" if i % 8 == 4 else "mamba" for i in range(16)],
                                  ffn_kinds=["moe" if i % 2 == 1 else "mlp" for i in range(16)],
                                  n_head=12, n_kv_head=4, head_dim=64, d_ffn=2048, n_experts=4, top_k=2,
                                  d_inner=1536, d_state=16, d_conv=4, dt_rank=48), "jamba"),
    # the pure Transformer of jamba-small's width and depth (its attention and dense MLP everywhere)
    "llama-16l": ("transformer", dict(vocab_size=32000, d_model=768, n_layer=16, n_head=12, n_kv_head=4, head_dim=64,
                                      d_ffn=2048, norm="rmsnorm", norm_eps=1e-6, mlp="gated", act="silu",
                                      positions="rope", max_positions=262144, rope_theta=10000.0,
                                      tie_embeddings=False), "llama"),
    # Zamba2-1.2B's layout reduced: width 1024, 24 Mamba-2 layers (16 heads x 64, d_state 64),
    # one shared block (MHA 16 x 128 over the 2C input, as Zamba2's attention_head_dim = 2C/heads)
    # run at every 6th layer (4 uses, each with its own KV), MLP adapters of rank 128
    "zamba2-small": ("zamba2", dict(vocab_size=32000, d_model=1024, n_layer=24,
                                    layer_kinds=["hybrid" if i % 6 == 5 else "mamba2" for i in range(24)],
                                    shared_blocks=[0 if i % 6 == 5 else None for i in range(24)],
                                    n_head=16, n_kv_head=16, head_dim=128, d_ffn=4096, n_mamba_heads=32,
                                    mamba_head_dim=64, d_state=64, adapter_rank=128, positions="rope"), "zamba2"),
    # the pure Transformer of zamba2-small's width and depth: MHA 16 x 64 and a SwiGLU MLP in every layer
    "llama-24l-1024": ("transformer", dict(vocab_size=32000, d_model=1024, n_layer=24, n_head=16, n_kv_head=16,
                                           head_dim=64, d_ffn=4096, norm="rmsnorm", norm_eps=1e-6, mlp="gated",
                                           act="silu", positions="rope", max_positions=262144, rope_theta=10000.0,
                                           tie_embeddings=False), "llama"),
}


def model_pair(shape: str, seed: int = 0, trained_like: bool = False, **overrides):
    """A random statecast model of a benchmark shape and transformers' class holding the
    same weights (statecast's init, copied through the converter's Hub name table). Both eval, fp32.

    ``trained_like``: matrices with std 1/sqrt(fan_in) instead (``demo.spread_weights``).
    The default init of Mamba (std 0.1 for 768 inputs) and of a MoE router (near-ties between
    experts) is chaotic over many layers: any rounding (int8, or float32 in another order)
    sends the logits elsewhere, which says nothing about a trained checkpoint. Speed does not
    depend on the values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from statecast.families import FAMILIES
    from statecast.families.tables import from_canonical_state

    family, dims, model_type = SHAPES[shape]
    fam = FAMILIES[family]
    arch = fam.arch(model_type)
    cfg_cls, model_cls = fam.model_classes()
    cfg = cfg_cls.from_unified({**dims, **overrides})
    ours = model_cls(cfg)
    ours.reset_parameters(generator=torch.Generator().manual_seed(seed))
    if trained_like:
        from statecast.families.builders import MAMBA_INIT, spread_weights

        spread_weights(ours, seed, keep=MAMBA_INIT)
    from transformers import PreTrainedConfig

    # config.json's content as from_pretrained decodes it ({"__float__": "Infinity"} -> inf)
    hf_json = PreTrainedConfig._decode_special_floats(arch.hf_config(cfg.to_unified(), None))
    hf_cfg = AutoConfig.for_model(**{**hf_json, **dict(arch.reference_kwargs)})
    try:  # skip transformers' random init (e.g. an orthogonal [V, C] head takes seconds)
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - other transformers versions
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        hf = AutoModelForCausalLM.from_config(hf_cfg)
    state = from_canonical_state(arch.formats[0], ours.state_dict())
    if family == "jamba":
        state = _fuse_experts(state)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]:
        raise RuntimeError(f"weights did not transfer: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    hf.generation_config.eos_token_id = hf.config.eos_token_id = None  # generate exactly the tokens asked for
    return ours.eval(), hf.eval()


def _fuse_experts(state: dict) -> dict:
    """Hub-format Jamba tensors (one per expert) -> transformers' in-memory layout, which
    fuses them (``experts.gate_up_proj`` [X, 2F, C], ``experts.down_proj`` [X, C, F]); its
    checkpoint loader does the same when it reads the Hub files."""
    import re

    out, groups = {}, {}
    for k, t in state.items():
        m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", k)
        if m:
            groups.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = t
        else:
            out[k] = t
    for prefix, g in groups.items():
        stack = {p: torch.stack([g[p][j] for j in range(len(g[p]))]) for p in g}
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack["gate"], stack["up"]], dim=1)
        out[f"{prefix}.down_proj"] = stack["down"]
    return out


def gemm_shapes(model, T: int) -> list[tuple[str, int, int, int, int]]:
    """The matrix products of one forward over T tokens (batch 1): (what, batch, m, k, n).

    Every ``nn.Linear`` is a [T, in] x [in, out] product, plus the head when it is tied
    to the embedding; attention adds q k^T and (attention x v) per head, computed in
    full. Convolutions, norms, the scans and the embedding lookup are not products."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out.append((name, 1, T, m.in_features, m.out_features))
    if getattr(model, "lm_head", "absent") is None:
        V, C = model.embed.weight.shape
        out.append(("head (tied)", 1, T, C, V))
    cfg = model.cfg
    for i, kind in enumerate(cfg.to_unified().get("layer_kinds", [])):
        if kind == "attention":
            out.append((f"layers.{i} scores", cfg.n_head, T, cfg.head_dim, T))
            out.append((f"layers.{i} weighted values", cfg.n_head, T, T, cfg.head_dim))
    return out


def gemm_floor_fn(model, T: int, preallocated: bool = True, extra: list | None = None):
    """A closure running one forward's matrix products alone (fp32, batch 1).

    preallocated: write into preallocated outputs (the strict floor); False allocates
    every output like a model does (fresh large buffers cost page faults: the [T, V]
    logits alone are 206 MB at T=1024). ``extra``: more products, as ``gemm_shapes`` gives
    them (what, batch, m, k, n), e.g. Mamba-2's SSD chunk products."""
    g = torch.Generator().manual_seed(0)
    shapes = [s[1:] for s in gemm_shapes(model, T) + list(extra or [])]
    xs, ws, outs = {}, {}, {}
    for b, m, k, n in set(shapes):
        xs[(b, m, k)] = torch.randn(b, m, k, generator=g) * 0.02
        ws[(b, k, n)] = torch.randn(b, k, n, generator=g) * 0.02
        outs[(b, m, n)] = torch.empty(b, m, n)
    prods = [(xs[(b, m, k)], ws[(b, k, n)], outs[(b, m, n)]) for b, m, k, n in shapes]

    def run():
        for x, w, o in prods:
            torch.bmm(x, w, out=o)

    def run_alloc():
        for x, w, _ in prods:
            torch.bmm(x, w)

    return run if preallocated else run_alloc


# --------------------------------------------------------------------------- decode floor


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step must read (batch 1): every parameter once, except
    the embedding tables (one row each), a tied head (the whole embedding matrix, read as
    the head), and a mixture of experts' expert matrices (only the ``top_k`` chosen of
    ``n_experts``; the router is read whole)."""
    from statecast.arch.layers import MoE

    share = {}  # id(param) -> fraction of it a token reads
    for m in model.modules():
        if isinstance(m, MoE):
            for p in (m.gate, m.up, m.down):
                share[id(p)] = m.top_k / m.n_experts
    total = 0.0
    for name, p in model.named_parameters():
        if name in ("embed.weight", "pos_embed.weight"):
            n = p.shape[1]
        else:
            n = p.numel() * share.get(id(p), 1.0)
        total += n * p.element_size()
    if getattr(model, "lm_head", "absent") is None:  # tied: the head is the embedding matrix
        total += model.embed.weight.numel() * model.embed.weight.element_size()
    return int(total)


def matvec_bandwidth_fn(V: int, C: int, n: int = 10):
    """10 [1, C] x [C, V] fp32 products (the lm head shape; weights stream from DRAM)
    and the bytes they read: bandwidth = bytes / time."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, C, generator=g)
    x = torch.randn(1, C, generator=g)
    out = torch.empty(1, V)

    def run():
        for _ in range(n):
            torch.mm(x, W.T, out=out)

    return run, n * W.numel() * W.element_size()


def read_bandwidth_fn(nbytes: int = 256 * 2**20, n: int = 4):
    """``n`` sums over an fp32 array of ``nbytes`` (far past any cache): a plain streaming
    read, the other bound on bandwidth besides the matvec kernels. Returns (run, bytes read)."""
    a = torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(0))

    def run():
        for _ in range(n):
            a.sum()

    return run, n * a.numel() * a.element_size()


def hf_generate_fn(hf, prompt: torch.Tensor):
    """``generate(n)``: transformers' greedy ``generate`` of exactly n new tokens after
    ``prompt`` [1, T] (use_cache, no eos), as transformers' eager decode runs."""
    gen_kw = dict(do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)

    def generate(n: int):
        return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, **gen_kw)

    return generate


def generate_ms_per_token(t_one: Timing, t_all: Timing, steps: int) -> float:
    """transformers' per-token decode time from ``generate`` timed for 1 and ``steps + 1``
    new tokens: (time(steps + 1) - time(1)) / steps, so the prompt and the first token
    cancel out (ms, best against best)."""
    return max(t_all.best - t_one.best, 0.0) / steps * 1e3
