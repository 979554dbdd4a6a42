"""Peak memory of ``verify`` in memory and layer-streamed (``statecast/parity/streamed.py``).

    .venv/bin/python bench/bench_verify_memory.py [--quick] [--json] [--threads N] [--hidden 512] [--layers 40] [--keep DIR]

Setup: a seeded transformers ``LlamaForCausalLM`` (GQA 4/2, SwiGLU, tokenizer of ~200 ids;
default 512 x 40 layers, 388 MB of float32 weights; ``--quick``: 256 x 8) saved with
``save_pretrained`` and ``pull``-ed. Then three fresh Python processes, one after the other,
each importing torch, transformers (the Llama class), accelerate and statecast's verify:

* ``imports``: stops there (the baseline);
* ``stream``: ``streamed_parity`` (greedy decoding and step-vs-parallel skipped, as by default);
* ``memory``: ``run_parity``, the in-memory report (with greedy decoding and step-vs-parallel).

Each child resets the kernel's high-water mark once its imports are done
(``/proc/self/clear_refs`` 5) and reports its RSS then and its peak RSS (``VmHWM``) at the end.
The increase is a child's peak minus the import-only child's RSS. ``getrusage``'s maxrss is
not used: it survives fork+exec, so a child of a large parent reports the parent's RSS.
The streamed and in-memory reports' logit metrics and per-layer NMSE are compared for
equality. Wall times are printed for information only. MB = 10**6 bytes. Linux only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, base_args, environment, print_table

CHILD = r"""
import json, re, sys, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[3]))
import accelerate.big_modeling, transformers
from statecast.checkpoints.layout import open_unified
from statecast.parity import streamed, verify
getattr(transformers, "LlamaForCausalLM")

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

Path("/proc/self/clear_refs").write_text("5")
out = {"rss_after_imports": status("VmRSS")}
t = time.perf_counter()
if sys.argv[1] == "stream":
    um = open_unified(sys.argv[2])
    r = streamed.streamed_parity(um, Path(um.source["path"]), torch.device("cpu"), verify.default_dtype(um.meta))
elif sys.argv[1] == "memory":
    r = verify.run_parity(sys.argv[2], device="cpu")
else:
    r = None
out["seconds"] = time.perf_counter() - t
out["peak"] = status("VmHWM")
if r is not None:
    keys = ("max_abs_diff", "mean_abs_diff", "logit_scale", "rel_max_abs_diff", "nmse_db", "kl_mean", "kl_max",
            "top1_agreement", "n_positions", "per_layer", "first_divergent_layer", "passed")
    out["report"] = {k: r[k] for k in keys}
print(json.dumps(out))
"""


def child(mode: str, path: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(threads)], capture_output=True, text=True,
                       env=env)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"the {mode} child failed")
    return json.loads(p.stdout.strip().splitlines()[-1])


def build(work: Path, hidden: int, layers: int) -> Path:
    sys.path.insert(0, str(REPO))
    from statecast.convert.pull import pull
    from statecast.families.transformer import build_hf_transformer

    model = work / f"llama-{hidden}x{layers}"
    if not (model / "statecast.json").is_file():
        src = build_hf_transformer(work / f"src-{hidden}x{layers}", "llama", hidden=hidden, layers=layers)
        pull(str(src), out=model, progress=False, force=model.exists())
    return model


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=None, help="d_model (default 512; --quick 256)")
    p.add_argument("--layers", type=int, default=None, help="blocks (default 40; --quick 8)")
    p.add_argument("--keep", type=Path, default=None, help="build the models here and keep them (default: a temporary dir)")
    args = p.parse_args()
    hidden = args.hidden or (256 if args.quick else 512)
    layers = args.layers or (8 if args.quick else 40)
    with tempfile.TemporaryDirectory(prefix="statecast-bench-verify-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = build(work, hidden, layers)
        model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        runs = {mode: child(mode, model, args.threads) for mode in ("imports", "stream", "memory")}
    base = runs["imports"]["rss_after_imports"]
    inc = {m: runs[m]["peak"] - base for m in ("stream", "memory")}
    identical = runs["stream"]["report"] == runs["memory"]["report"]
    result = {
        "model": {"hidden": hidden, "layers": layers, "bytes": model_bytes},
        "baseline_rss_bytes": base,
        "peak_increase_bytes": inc,
        "model_over_increase": {m: model_bytes / v for m, v in inc.items()},
        "seconds": {m: runs[m]["seconds"] for m in ("stream", "memory")},
        "identical_metrics": identical,
        "passed": {m: runs[m]["report"]["passed"] for m in ("stream", "memory")},
        "environment": environment(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    mb = 1e6
    print_table(
        f"verify of a Llama {hidden} x {layers} ({model_bytes / mb:.0f} MB float32) on {result['environment']['processor']}, "
        f"{args.threads} threads",
        ["verify", "peak RSS over imports (MB)", "model / increase", "passed", "seconds (info)"],
        [[m, inc[m] / mb, model_bytes / inc[m], runs[m]["report"]["passed"], runs[m]["seconds"]] for m in ("memory", "stream")],
        [f"import-only child: {base / mb:.0f} MB RSS",
         f"logit metrics and per-layer NMSE identical: {identical}"],
    )


if __name__ == "__main__":
    main()
