"""Decode through the exported ONNX graphs (onnxruntime, CPU): latency against position,
against the weight-streaming floor, transformers and BlinkDL's rwkv package; graph and
state sizes.

    .venv/bin/python bench/bench_onnx.py [--quick] [--json] [--threads N] [--plot PNG]
                                         [--models rwkv-169m,mamba-130m,mamba2-130m,llama-small,jamba-small]
                                         [--positions 64,512,2048,8192] [--out DIR] [--profile]

Models: random weights (statecast's init, seed 0; Mamba and Jamba with trained-like
magnitudes, see ``trained_like``) of ``common.SHAPES["rwkv-169m"]``,
``["mamba-130m"]``, ``["mamba2-130m"]`` (24 x 768, 24 heads x 64, d_state 128), ``["llama-small"]`` (the Transformer of the same size: 12 x 768, GQA
12/4) and ``["jamba-small"]`` (16 x 768, attention on 2 layers, 4 experts top-2 on the odd
layers). Each is written as a checkpoint (RWKV: BlinkDL's native ``.pth``; the others:
Hub-format safetensors + config.json), ``pull``-ed into the unified layout and exported
with ``export_onnx`` as fp32 and int8 (each export passed its parity check). All of it is
cached under ``--out`` (one directory per shape and dimensions) and reused.
Batch 1, onnxruntime CPU provider with ``intra_op_num_threads = --threads`` (2), torch
with the same thread count.

Everything of one family is timed in ONE interleaved run (``common.time_interleaved``: a, b,
c, a, b, c, ... so that a change in machine load hits all alike, with an untimed 0.2 s pause
before each sample so that the previous function's spinning thread pool is idle). Every
ms/token figure is the best of ``--repeats`` rounds (medians are in ``--json``); every ratio
is the median over the rounds of the ratio within one round, because the machine's memory
bandwidth drifts between rounds (by up to 2x on a shared host, unseen by the CPU check),
and the bests of two functions can come from different rounds (``*_of_bests`` in --json):
  ONNX @ P      ``session.run`` of one token whose past holds P-1 positions; a sample is
                ``--calls`` such calls on the same inputs (ms/token = sample / calls).
                The past: 8 real tokens stepped through the graph, then for KV caches
                (Transformer, Jamba's attention layers) zero positions prepended up to
                P-1. RWKV's and Mamba's state has a fixed size that no position changes,
                so their step is the same graph call at every P (stepping 8191 tokens
                through the graph to get "the" state at 8192 would take minutes and
                compute the same thing).
  floor         bytes of weights one token must read (``common.weight_bytes_per_token``:
                every matrix, the head included when tied to the embedding, one embedding
                row, Jamba's router and only its top-k of the experts) / the better of two
                matrix-vector bandwidths timed here: torch's product of the head's shape
                (bench_decode.py's) and onnxruntime's (a graph of one independent
                [1, in] x [in, out] MatMul per matrix of the model, its top-k experts for
                Jamba: the matrix bytes / its time). torch's matvec streams at well under
                onnxruntime's, so that one alone is no floor for onnxruntime.
  read floor    the same bytes / a plain streaming read (torch sum of 256 MB): what the
                memory delivers when no matvec kernel is in the way (a stricter bound)
  transformers  eager ``generate`` on the same weights, greedy, use_cache, after a 16-token
                prompt: (time(steps+1 new) - time(1 new)) / steps (as bench_decode.py), so
                it covers positions 17..16+steps; compared with ONNX @ 64
  rwkv package  ``rwkv.model.RWKV(path.pth, strategy="cpu fp32")`` (RWKV_JIT_ON=0,
                RWKV_CUDA_ON=0), ``forward([token], state)`` per token, state carried
  sizes         graph bytes (model.onnx + model.onnx.data) per dtype; state bytes: the
                ``present.*`` tensors a step returns (at P=2048 for KV caches)
No wall-clock threshold is asserted; the ratios come from the same run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    SHAPES,
    Timing,
    _json_default,
    base_args,
    emit,
    environment,
    generate_ms_per_token,
    hf_generate_fn,
    matvec_bandwidth_fn,
    model_pair,
    print_table,
    read_bandwidth_fn,
    set_threads,
    time_interleaved,
    weight_bytes_per_token,
)

from statecast import __version__
from statecast.checkpoints.layout import is_unified
from statecast.convert.pull import pull
from statecast.errors import ParityFailed
from statecast.export import onnx as onnx_export
from statecast.export.onnx import export_onnx
from statecast.families import FAMILIES
from statecast.families.tables import from_canonical_state
from statecast.runtime.ort import OnnxModel

MODELS = ("rwkv-169m", "mamba-130m", "mamba2-130m", "llama-small", "jamba-small")
POSITIONS = (64, 512, 2048, 8192)
DTYPES = ("fp32", "int8")
PARITY_FAILED = "bench-parity-failed.json"  # written beside an export that failed its parity bounds
SETTLE = 0.2  # s of idle before each timed sample (time_interleaved's settle)
STATE_AT = 2048  # state bytes of KV families are reported at this position
WARM_TOKENS = 8  # real tokens stepped through the graph before timing
PROMPT = 16  # transformers' prompt
TARGETS = {"growth_8192_over_64": 1.1, "onnx_over_floor": 1.25, "tf_over_fp32": 1.3, "tf_over_int8": 2.5,
           "pkg_over_onnx": 1.0}
COLORS = {"rwkv-169m": "tab:blue", "mamba-130m": "tab:green", "llama-small": "tab:red", "jamba-small": "tab:purple"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- models and exports


def dims_for(shape: str, quick: bool) -> dict:
    """The shape's unified dimensions; ``quick``: few layers and a small vocabulary."""
    dims = dict(SHAPES[shape][1])
    if not quick:
        return dims
    dims["vocab_size"] = 1000
    if "layer_kinds" in dims:  # Jamba: the first block of 8 (attention on layer 4, MoE on odd layers)
        dims.update(n_layer=8, layer_kinds=dims["layer_kinds"][:8], ffn_kinds=dims["ffn_kinds"][:8])
    else:
        dims["n_layer"] = 2
    return dims


@functools.cache
def code_hash() -> str:
    """Of the code an export depends on (the models, their state dicts' names, the exporter):
    an edit there makes new exports rather than reusing stale ones. Taken once, when the
    script starts (just after it imported that code), so that a later edit to the files
    cannot label exports made by the code already imported."""
    pkg = Path(__file__).resolve().parents[1] / "statecast"
    files = sorted(pkg.glob("arch/*.py")) + sorted(pkg.glob("convert/*.py")) + sorted(pkg.glob("runtime/*.py"))
    h = hashlib.sha256(__version__.encode())
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def trained_like(shape: str) -> bool:
    """Mamba and Jamba get trained-like weight magnitudes (``common.model_pair``): their default
    random init is chaotic, and the int8 graph's parity check would judge the init, not the export."""
    return SHAPES[shape][0] in ("mamba", "mamba2", "jamba")


def cache_dir(root: Path, shape: str, dims: dict, seed: int) -> Path:
    key = json.dumps({"shape": shape, "dims": dims, "seed": seed, "trained_like": trained_like(shape),
                      "code": code_hash()}, sort_keys=True)
    return root / f"{shape}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def write_source(ours, shape: str, where: Path) -> Path:
    """``ours``'s weights as a checkpoint ``pull`` reads: RWKV as BlinkDL's native ``.pth``
    (which the rwkv package loads too), the others as a Hub-format directory. Returns
    the path to pull."""
    family, _, model_type = SHAPES[shape]
    fam = FAMILIES[family]
    where.mkdir(parents=True, exist_ok=True)
    if family == "rwkv":
        state = from_canonical_state(fam.native.fmt, ours.state_dict())
        path = where / "rwkv-4-random.pth"
        torch.save({k: v.detach().clone().contiguous() for k, v in state.items()}, path)
        return path
    from safetensors.torch import save_file

    arch = fam.arch(model_type)
    state = from_canonical_state(arch.formats[0], ours.state_dict())
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(where / "model.safetensors"))
    (where / "config.json").write_text(json.dumps(arch.hf_config(ours.cfg.to_unified(), None), indent=2) + "\n")
    return where


def ensure_exports(ours, shape: str, d: Path) -> dict:
    """The unified directory and the fp32/int8 exports of ``ours`` under ``d`` (built once)."""
    unified = d / "unified"
    source = d / "source"
    native = source / "rwkv-4-random.pth"
    if not is_unified(unified):
        log(f"{shape}: writing the checkpoint and pulling it into the unified layout")
        src = write_source(ours, shape, source)
        pull(str(src), out=unified, force=True, progress=False)
    exports = {}
    for dtype in DTYPES:
        out = d / f"onnx-{dtype}"
        if not (out / "statecast.json").is_file():
            log(f"{shape}: exporting ONNX {dtype}")
            t0 = time.perf_counter()
            say = lambda m, s=shape: log(f"{s}:   {m}")  # noqa: E731
            try:
                export_onnx(unified, dtype=dtype, out=out, force=True, progress=say)
            except ParityFailed as e:
                # random weights can fail the int8 check (its bounds assume trained weights'
                # activations); the graph's speed does not depend on it: export it with the
                # bounds recorded only, and report the failure
                log(f"{shape}: {e}; exporting again with the {dtype} bounds recorded, not judged")
                saved = onnx_export.THRESHOLDS[dtype]
                onnx_export.THRESHOLDS[dtype] = {k: None for k in saved}
                try:
                    export_onnx(unified, dtype=dtype, out=out, force=True, progress=say)
                finally:
                    onnx_export.THRESHOLDS[dtype] = saved
                (out / PARITY_FAILED).write_text(json.dumps({"error": str(e), "thresholds": saved}, indent=2) + "\n")
            log(f"{shape}: {dtype} export took {time.perf_counter() - t0:.0f} s")
        exports[dtype] = out
    return {"unified": unified, "exports": exports, "native": native if native.is_file() else None}


def parity_of(export: Path) -> dict:
    """The export's parity metrics; ``passed`` False when it failed the bounds (see ensure_exports)."""
    report = json.loads((export / "parity.json").read_text())
    out = {k: report[k] for k in ("passed", "max_abs_diff", "top1_agreement", "kl_mean", "greedy_agreement")}
    if (export / PARITY_FAILED).is_file():
        out.update(passed=False, thresholds=json.loads((export / PARITY_FAILED).read_text())["thresholds"])
    return out


def graph_bytes(export: Path) -> int:
    desc = json.loads((export / "statecast.json").read_text())
    return sum((export / f).stat().st_size for f in (desc["graph"], desc["external_data"]) if f)


# --------------------------------------------------------------------------- ONNX steps


def output_names(om: OnnxModel) -> list[str]:
    return ["logits"] + [s["output"] for s in om.state_specs]


def warm_state(om: OnnxModel, vocab: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, vocab, (1, WARM_TOKENS), dtype=np.int64)
    return om.prefill(ids)[1]


def past_of(om: OnnxModel, warm: dict[str, np.ndarray], past: int) -> dict[str, np.ndarray]:
    """``warm`` with every KV history grown to ``past`` positions (zeros prepended); a
    fixed-size state is returned as it is."""
    out = {}
    for s in om.state_specs:
        t = warm[s["input"]]
        axis = s.get("length_axis")
        if axis is not None:
            have = t.shape[axis]
            if past < have:
                t = np.take(t, np.arange(have - past, have), axis=axis)
            elif past > have:
                shape = list(t.shape)
                shape[axis] = past - have
                t = np.concatenate([np.zeros(shape, t.dtype), t], axis=axis)
            t = np.ascontiguousarray(t)
        out[s["input"]] = t
    return out


def step_fn(om: OnnxModel, feed: dict, calls: int):
    names, session = output_names(om), om.session

    def run():
        for _ in range(calls):
            session.run(names, feed)

    return run


def present_bytes(om: OnnxModel, feed: dict) -> int:
    outs = om.session.run(output_names(om), feed)
    return int(sum(o.nbytes for o in outs[1:]))


def per_round(t: Timing, repeats: int) -> np.ndarray | None:
    """A ``time_interleaved`` Timing's samples, one per round, when no round was dropped."""
    return np.asarray(t.samples) if len(t.samples) == repeats else None


def profile_step(export: Path, feed: dict, threads: int, calls: int, out_dir: Path) -> list[tuple[str, float]]:
    """onnxruntime's profile of ``calls`` steps: (op type, share of the node time), largest first."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(out_dir / f"ort-profile-{export.parent.name}-{export.name}")
    desc = json.loads((export / "statecast.json").read_text())
    sess = ort.InferenceSession(str(export / desc["graph"]), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    for _ in range(2):
        sess.run(names, feed)
    for _ in range(calls):
        sess.run(names, feed)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()  # tens of MB each; the summary is returned
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    total = sum(by_op.values()) or 1.0
    return sorted(((op, t / total) for op, t in by_op.items()), key=lambda x: -x[1])


# --------------------------------------------------------------------------- rwkv package


def ort_matvec_bandwidth_fn(model, threads: int):
    """onnxruntime's matrix-vector products with the model's own matrices, timed alone: one
    [1, in] x [in, out] MatMul per ``nn.Linear`` (the tied head included; for a mixture of
    experts, ``top_k`` experts' matrices per layer), fp32, independent of each other.
    Returns (run, bytes of the matrices): onnxruntime's matvec bandwidth on these shapes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from statecast.arch.layers import MoE

    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]  # [out, in]
    if getattr(model, "lm_head", "absent") is None:
        mats.append(model.embed.weight)
    for m in model.modules():
        if isinstance(m, MoE):
            mats += [w[j] for w in (m.gate, m.up, m.down) for j in range(m.top_k)]
    inits, nodes, inputs, outputs = [], [], {}, []
    for i, w in enumerate(mats):
        out, k = w.shape
        inputs.setdefault(k, helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]))
        inits.append(numpy_helper.from_array(w.detach().T.contiguous().numpy(), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, out]))
    graph = helper.make_graph(nodes, "matvecs", list(inputs.values()), outputs, inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    del inits
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(onnx_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del onnx_model, graph
    rng = np.random.default_rng(0)
    feed = {f"x{k}": rng.standard_normal((1, k), dtype=np.float32) for k in inputs}
    names = [o.name for o in outputs]

    def run():
        sess.run(names, feed)

    return run, sum(w.numel() * 4 for w in mats)


def rwkv_package(native: Path):
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    with contextlib.redirect_stdout(io.StringIO()):
        from rwkv.model import RWKV

        return RWKV(model=str(native), strategy="cpu fp32", verbose=False)


def rwkv_package_fn(pkg, ids: list[int], calls: int):
    """``calls`` single-token forwards, the state carried (starting after ``ids``)."""
    with torch.inference_mode():
        box = [pkg.forward(ids, None)[1]]
    tok = ids[-1]

    def run():
        with torch.inference_mode():
            for _ in range(calls):
                box[0] = pkg.forward([tok], box[0])[1]

    return run


# --------------------------------------------------------------------------- one family


def bench_family(shape: str, args, root: Path, threads: int) -> dict:
    dims = dims_for(shape, args.quick)
    d = cache_dir(root, shape, dims, args.seed)
    log(f"{shape}: building the models (seed {args.seed})")
    ours, hf = model_pair(shape, seed=args.seed, trained_like=trained_like(shape), **dims)
    paths = ensure_exports(ours, shape, d)
    V, C = dims["vocab_size"], dims["d_model"]
    sessions = {dt: OnnxModel(paths["exports"][dt], threads=threads) for dt in DTYPES}
    kv = sessions["fp32"].past_length(sessions["fp32"].init_state(1)) is not None
    token = np.array([[1]], dtype=np.int64)
    feeds = {}
    for dt, om in sessions.items():
        warm = warm_state(om, V)
        for P in args.positions:
            feeds[dt, P] = {"input_ids": token, **past_of(om, warm, P - 1)}
    state_P = STATE_AT if kv else args.positions[0]
    state_feed = {"input_ids": token, **past_of(sessions["fp32"], warm_state(sessions["fp32"], V), state_P - 1)}
    state_bytes = present_bytes(sessions["fp32"], state_feed)
    state_by_position = {P: present_bytes(sessions["fp32"], feeds["fp32", P]) for P in args.positions}
    del state_feed

    fns = {f"{dt}@{P}": step_fn(sessions[dt], feeds[dt, P], args.calls) for dt in DTYPES for P in args.positions}
    probes = {"torch matvec": matvec_bandwidth_fn(V, C), "onnxruntime matvec": ort_matvec_bandwidth_fn(ours, threads),
              "read": read_bandwidth_fn()}
    for name, (fn, _) in probes.items():
        fns[f"bandwidth: {name}"] = fn
    prompt = torch.randint(0, V, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    generate = hf_generate_fn(hf, prompt)
    fns["tf_1"] = lambda: generate(1)
    fns["tf_all"] = lambda: generate(args.steps + 1)
    pkg = None
    if paths["native"] is not None:
        pkg = rwkv_package(paths["native"])
        fns["rwkv_package"] = rwkv_package_fn(pkg, prompt[0, :WARM_TOKENS].tolist(), args.calls)
        with torch.inference_mode():  # same weights, same logits?
            ids = prompt[0, :WARM_TOKENS].tolist()
            ref = pkg.forward(ids, None, full_output=True)[0].float().numpy()  # [T, V]
            ours_logits = sessions["fp32"](np.asarray([ids]))[0][0]
            pkg_diff = float(np.abs(ref - ours_logits).max())
    log(f"{shape}: timing {len(fns)} functions interleaved, {args.repeats} rounds")
    t0 = time.perf_counter()
    with torch.inference_mode():
        t = time_interleaved(fns, args.repeats, settle=SETTLE)
    log(f"{shape}: timed in {time.perf_counter() - t0:.0f} s")

    # ms/token figures: best of the rounds. Ratios: the median over rounds of the ratio
    # within a round (the machine's memory bandwidth drifts between rounds by up to 2x,
    # invisibly to the CPU-contention check; within a round the functions run seconds apart)
    per_token = {k: v.best / args.calls * 1e3 for k, v in t.items() if "@" in k or k == "rwkv_package"}
    median = {k: v.median / args.calls * 1e3 for k, v in t.items() if "@" in k or k == "rwkv_package"}
    rnd = {k: per_round(v, args.repeats) for k, v in t.items()}  # seconds per round, or None
    nbytes = weight_bytes_per_token(ours)
    bandwidths = {name: nb / t[f"bandwidth: {name}"].best for name, (_, nb) in probes.items()}
    bw_name = max((k for k in bandwidths if "matvec" in k), key=bandwidths.get)
    floor_ms = nbytes / bandwidths[bw_name] * 1e3
    torch_floor_ms = nbytes / bandwidths["torch matvec"] * 1e3
    read_floor_ms = nbytes / bandwidths["read"] * 1e3
    tf_ms = generate_ms_per_token(t["tf_1"], t["tf_all"], args.steps)
    p0, pN = args.positions[0], args.positions[-1]
    fp32_0, int8_0 = per_token[f"fp32@{p0}"], per_token[f"int8@{p0}"]

    def paired(num: str, den: str, best: float):
        """Median over rounds of round(num) / round(den); ``best`` when rounds are missing."""
        a, b = rnd.get(num), rnd.get(den)
        return best if a is None or b is None else float(np.median(a / b))

    matvec = [k for k in probes if "matvec" in k]
    if all(rnd[f"bandwidth: {k}"] is not None for k in probes):  # per-round floors
        round_bw = {k: probes[k][1] / rnd[f"bandwidth: {k}"] for k in probes}
        rnd["floor"] = nbytes / np.max([round_bw[k] for k in matvec], axis=0) * args.calls
        rnd["read floor"] = nbytes / round_bw["read"] * args.calls
    if rnd["tf_1"] is not None and rnd["tf_all"] is not None:
        rnd["tf"] = np.maximum(rnd["tf_all"] - rnd["tf_1"], 0.0) / args.steps * args.calls
    r = {
        "shape": shape,
        "dims": dims,
        "n_params": sum(p.numel() for p in ours.parameters()),
        "kv_cache": kv,
        "export_dir": str(d),
        "ms_per_token": {dt: {P: per_token[f"{dt}@{P}"] for P in args.positions} for dt in DTYPES},
        "ms_per_token_median": {dt: {P: median[f"{dt}@{P}"] for P in args.positions} for dt in DTYPES},
        "growth": {dt: paired(f"{dt}@{pN}", f"{dt}@{p0}", per_token[f"{dt}@{pN}"] / per_token[f"{dt}@{p0}"])
                   for dt in DTYPES},
        "growth_of_bests": {dt: per_token[f"{dt}@{pN}"] / per_token[f"{dt}@{p0}"] for dt in DTYPES},
        "weight_bytes_per_token": nbytes,
        "bandwidth_GBps": {name: b / 1e9 for name, b in bandwidths.items()},
        "floor_bandwidth": bw_name,
        "floor_ms_per_token": floor_ms,
        "fp32_over_floor": paired(f"fp32@{p0}", "floor", fp32_0 / floor_ms),
        "fp32_over_floor_of_bests": fp32_0 / floor_ms,
        "torch_matvec_floor_ms_per_token": torch_floor_ms,
        "fp32_over_torch_matvec_floor": fp32_0 / torch_floor_ms,
        "read_floor_ms_per_token": read_floor_ms,
        "fp32_over_read_floor": paired(f"fp32@{p0}", "read floor", fp32_0 / read_floor_ms),
        "transformers_ms_per_token": tf_ms,
        "transformers_positions": f"{PROMPT + 1}..{PROMPT + args.steps}",
        "transformers_over_fp32": paired("tf", f"fp32@{p0}", tf_ms / fp32_0),
        "transformers_over_int8": paired("tf", f"int8@{p0}", tf_ms / int8_0),
        "transformers_over_fp32_of_bests": tf_ms / fp32_0,
        "transformers_over_int8_of_bests": tf_ms / int8_0,
        "graph_bytes": {dt: graph_bytes(paths["exports"][dt]) for dt in DTYPES},
        "state_bytes": state_bytes,
        "state_bytes_at": state_P if kv else "any",
        "state_bytes_by_position": state_by_position,
        "parity": {dt: parity_of(paths["exports"][dt]) for dt in DTYPES},
        "timings": t,
    }
    if pkg is not None:
        r["rwkv_package_ms_per_token"] = per_token["rwkv_package"]
        r["rwkv_package_over_fp32"] = paired("rwkv_package", f"fp32@{p0}", per_token["rwkv_package"] / fp32_0)
        r["rwkv_package_over_fp32_of_bests"] = per_token["rwkv_package"] / fp32_0
        r["rwkv_package_max_logit_diff"] = pkg_diff
    if args.profile:
        r["profile"] = {}
        runs = [(dt, p0) for dt in DTYPES] + ([("fp32", pN)] if kv and pN != p0 else [])
        for dt, P in runs:
            prof = profile_step(paths["exports"][dt], feeds[dt, P], threads, max(args.calls, 4), root)
            r["profile"][f"{dt}@{P}"] = prof
            log(f"{shape} {dt} @ {P}: " + ", ".join(f"{op} {share:.0%}" for op, share in prof[:8]))
    del sessions, feeds, fns, pkg, hf, ours
    return r


# --------------------------------------------------------------------------- output


def targets(results: dict, positions) -> list[str]:
    """One line per target of the issue: measured value, target, met or missed."""
    lines = []
    T = TARGETS

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    for s, r in results.items():
        if not r["kv_cache"]:
            g = r["growth"]["fp32"]
            lines.append(f"{s}: fp32 latency {positions[-1]}/{positions[0]} = {g:.2f} (target <= {T['growth_8192_over_64']}): "
                         f"{verdict(g <= T['growth_8192_over_64'])}")
        f = r["fp32_over_floor"]
        lines.append(f"{s}: fp32 ONNX / floor = {f:.2f} (target <= {T['onnx_over_floor']}): {verdict(f <= T['onnx_over_floor'])}")
        a, b = r["transformers_over_fp32"], r["transformers_over_int8"]
        lines.append(f"{s}: transformers / ONNX fp32 = {a:.2f} (target >= {T['tf_over_fp32']}): {verdict(a >= T['tf_over_fp32'])}; "
                     f"transformers / ONNX int8 = {b:.2f} (target >= {T['tf_over_int8']}): {verdict(b >= T['tf_over_int8'])}")
        for dt, par in r["parity"].items():
            if not par["passed"]:
                lines.append(f"{s}: the {dt} export FAILED its parity bounds {par.get('thresholds')} (top1 "
                             f"{par['top1_agreement']:.3f}, kl_mean {par['kl_mean']:.3g}); timed anyway")
        if "rwkv_package_over_fp32" in r:
            c = r["rwkv_package_over_fp32"]
            lines.append(f"{s}: rwkv package / ONNX fp32 = {c:.2f} (target >= {T['pkg_over_onnx']}): {verdict(c >= T['pkg_over_onnx'])}")
    return lines


def print_results(results: dict, positions, threads: int, repeats: int, calls: int) -> None:
    p0, pN = positions[0], positions[-1]
    rows = []
    for s, r in results.items():
        for dt in DTYPES:
            rows.append([s if dt == "fp32" else "", dt, *(r["ms_per_token"][dt][P] for P in positions), r["growth"][dt]])
    print_table(
        f"ONNX decode ms/token at position P (onnxruntime CPU, {threads} threads, batch 1; best of {repeats} "
        f"samples of {calls} calls)",
        ["model", "graph", *(f"P={P}" for P in positions), f"{pN}/{p0}"],
        rows,
        notes=["RWKV and Mamba: fixed-size state, the same graph call at every P; "
               "Transformer/Jamba: KV histories of P-1 positions",
               f"{pN}/{p0}: median over rounds of the within-round ratio"],
    )
    rows = []
    for s, r in results.items():
        pkg = r.get("rwkv_package_ms_per_token")
        rows.append([s, r["floor_ms_per_token"], r["read_floor_ms_per_token"], r["ms_per_token"]["fp32"][p0],
                     r["fp32_over_floor"], r["fp32_over_read_floor"],
                     r["ms_per_token"]["int8"][p0], r["transformers_ms_per_token"], r["transformers_over_fp32"],
                     r["transformers_over_int8"], "-" if pkg is None else pkg,
                     "-" if pkg is None else r["rwkv_package_over_fp32"]])
    print_table(
        f"ONNX @ P={p0} against the floor, transformers generate and the rwkv package (ms/token)",
        ["model", "floor", "read floor", "fp32", "fp32/floor", "fp32/read", "int8", "transformers", "tf/fp32", "tf/int8",
         "rwkv pkg", "pkg/fp32"],
        rows,
        notes=[f"{s}: {r['weight_bytes_per_token'] / 1e6:.0f} MB/token; floor at "
               f"{r['bandwidth_GBps'][r['floor_bandwidth']]:.1f} GB/s ({r['floor_bandwidth']}; bandwidths "
               + ", ".join(f"{k} {v:.1f}" for k, v in r["bandwidth_GBps"].items()) + " GB/s)"
               for s, r in results.items()]
        + [f"transformers: eager generate, positions {next(iter(results.values()))['transformers_positions']}",
           "ms: best of the rounds; ratios: median over rounds of the within-round ratio"],
    )
    rows = []
    for s, r in results.items():
        rows.append([s, f"{r['n_params'] / 1e6:.1f}M", r["graph_bytes"]["fp32"], r["graph_bytes"]["int8"],
                     r["state_bytes"], r["state_bytes_at"]])
    print_table("sizes (bytes)", ["model", "params", "graph fp32", "graph int8", "state", "state at P"], rows)
    print("\ntargets:")
    for line in targets(results, positions):
        print(f"  {line}")


def plot(results: dict, positions, path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    for s, r in results.items():
        c = COLORS.get(s)
        ax.plot(positions, [r["ms_per_token"]["fp32"][P] for P in positions], "o-", color=c, label=f"{s} ONNX fp32")
        ax.plot(positions, [r["ms_per_token"]["int8"][P] for P in positions], "s--", color=c, alpha=0.6, ms=4,
                label=f"{s} ONNX int8")
        a, b = r["transformers_positions"].split("..")
        ax.plot([(int(a) + int(b)) / 2], [r["transformers_ms_per_token"]], "x", color=c, ms=9, mew=2,
                label=f"{s} transformers generate")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(positions)
    ax.set_xticklabels([str(P) for P in positions])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("position P (past length P-1); transformers x: mean position of its generate steps")
    ax.set_ylabel("ms / token")
    ax.set_title(f"decode per token, onnxruntime CPU, {threads} threads, batch 1")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _int_keys(obj):
    """JSON object keys that were ints (positions) back to ints."""
    if isinstance(obj, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_int_keys(v) for v in obj]
    return obj


def main() -> None:
    p = base_args(__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated shapes (default: all of MODELS)")
    p.add_argument("--positions", default=",".join(map(str, POSITIONS)), help="comma-separated positions")
    p.add_argument("--steps", type=int, default=None, help="transformers generate steps (default 64, quick 8)")
    p.add_argument("--calls", type=int, default=None, help="graph calls per timed sample (default 4, quick 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/statecast-bench/onnx", help="cache of checkpoints and exports")
    p.add_argument("--plot", default=None, help="write a PNG of ms/token against position")
    p.add_argument("--profile", action="store_true",
                   help="onnxruntime profile of the first position's step (and the last one's for KV caches)")
    p.add_argument("--reuse-results", action="store_true",
                   help="take a family's results from the last run that finished it (OUT/results-SHAPE.json)")
    args = p.parse_args()
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        # said now rather than only after the run; the run goes on, the plot will fail at the end
        log("matplotlib is not installed (pip install -e '.[bench]'): the tables and JSON will be written, "
            f"{args.plot} will not")
    threads = set_threads(args.threads)
    for fam in FAMILIES.values():  # import every model's code now, then hash it (code_hash)
        fam.model_classes()
    code_hash()
    args.positions = [64, 512] if args.quick and args.positions == ",".join(map(str, POSITIONS)) else \
        [int(x) for x in args.positions.split(",")]
    args.steps = args.steps or (8 if args.quick else 64)
    args.calls = args.calls or (2 if args.quick else 4)
    args.repeats = args.repeats or (2 if args.quick else 9)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for shape in args.models.split(","):
        saved = root / f"results-{shape}{'-quick' if args.quick else ''}.json"
        if args.reuse_results and saved.is_file():
            results[shape] = _int_keys(json.loads(saved.read_text()))
            log(f"{shape}: results of an earlier run reused from {saved}")
            continue
        results[shape] = bench_family(shape, args, root, threads)
        saved.write_text(json.dumps(results[shape], indent=2, default=_json_default) + "\n")
    import onnxruntime

    out = {"bench": "onnx", "positions": args.positions, "threads": threads, "repeats": args.repeats,
           "calls_per_sample": args.calls, "steps": args.steps, "results": results,
           "targets": targets(results, args.positions), "onnxruntime": onnxruntime.__version__,
           "env": environment(), "plot": args.plot}
    # Everything is saved and printed before the plot is attempted: a full run takes minutes
    # and a missing or broken matplotlib must not cost its timings.
    summary = root / f"results{'-quick' if args.quick else ''}.json"
    summary.write_text(json.dumps(out, indent=2, default=_json_default) + "\n")
    log(f"wrote {summary}")
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():  # --json: tables on stderr
        print_results(results, args.positions, threads, args.repeats, args.calls)
        print(f"\n  {environment()['processor']}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    emit(out, args.json)
    sys.stdout.flush()
    if args.plot:
        try:
            plot(results, args.positions, Path(args.plot), threads)
        except Exception as e:  # noqa: BLE001 - any failure of the plot is reported the same way
            print(f"bench_onnx: plot {args.plot} not written: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)
        log(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
