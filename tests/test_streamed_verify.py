"""Layer-streamed verify (``statecast/parity/streamed.py``): the in-memory report's numbers, in
about one block's memory.

* Equality: for a model of each family (the Llama one 40 MB), the streamed report has exactly
  the in-memory report's logit metrics, per-layer NMSE, checks and, with ``decode=True``, greedy
  tokens and step-vs-parallel: both sides compute the same function on the same bytes, in the
  same order (offloading moves weights, not arithmetic), so nothing differs in the last bit.
* Release: our blocks are mapped only while they run (a map per tensor; /proc/self/maps).
* Memory: a 388 MB model is verified by a child process whose peak RSS grows by under a quarter
  of the model over a child that only imports (the cap: model >= 4 x increment).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import factories
import pytest
import torch

from statecast.checkpoints.layout import open_unified
from statecast.convert.pull import pull
from statecast.errors import StatecastError
from statecast.parity.streamed import SKIPPED_WITHOUT_DECODE, StreamedModel, parse_max_memory, streamed_parity
from statecast.parity.verify import default_dtype, run_parity

# every number run_parity judges or records about the two models
METRICS = ("max_abs_diff", "mean_abs_diff", "logit_scale", "rel_max_abs_diff", "nmse_db", "kl_mean", "kl_max",
           "top1_agreement", "n_positions", "per_layer", "first_divergent_layer", "per_layer_view", "passed")
DECODED = ("greedy_agreement", "step_vs_parallel_max_abs_diff", "step_vs_parallel_rel_diff", "greedy")

SOURCES = {
    # 4 x 9.6 MB blocks: q/o 512x512, k/v 256x512 (GQA 4/2), SwiGLU 512 -> 1056
    "llama-40mb": lambda out: factories.hf_transformer(out, "llama", hidden=512, layers=4),
    "rwkv": factories.hf_rwkv,  # embed_norm outside the blocks
    "mamba-tied": factories.hf_mamba,  # the head is the embedding
    "gpt2-tied": lambda out: factories.hf_transformer(out, "gpt2", tied=True),  # learned positions
    "jamba-sharded": lambda out: factories.hf_jamba(out, shard="60KB"),  # experts re-saved by transformers
}


def _pulled(tmp_path: Path, name: str) -> Path:
    src = SOURCES[name](tmp_path / "src")
    return Path(pull(str(src), out=tmp_path / "model", progress=False)["path"])


def _streamed(path: Path, dtype: str | None = None, **kw) -> dict:
    um = open_unified(path)
    return streamed_parity(um, Path(um.source["path"]), torch.device("cpu"), dtype or default_dtype(um.meta), **kw)


@pytest.mark.parametrize("name", list(SOURCES))
def test_streamed_report_is_identical_to_the_in_memory_one(tmp_path, name, one_thread):
    path = _pulled(tmp_path, name)
    memory = run_parity(path, device="cpu")
    streamed = _streamed(path, decode=True)
    assert memory["passed"]
    for key in METRICS + DECODED:
        assert streamed[key] == memory[key], key
    assert streamed["checks"] == memory["checks"]
    assert set(memory) <= set(streamed) and streamed["streamed"]["skipped"] == []
    assert "disk" in streamed["streamed"]["placement"].values()


def test_without_decode_the_decoding_checks_are_skipped_not_judged(tmp_path, one_thread):
    path = _pulled(tmp_path, "llama-40mb")
    memory = run_parity(path, device="cpu")
    streamed = _streamed(path)
    for key in METRICS:
        assert streamed[key] == memory[key], key
    for key in SKIPPED_WITHOUT_DECODE:
        assert key not in streamed and key not in streamed["checks"]
    assert streamed["greedy"] is None and streamed["streamed"]["skipped"] == list(SKIPPED_WITHOUT_DECODE)
    assert streamed["streamed"]["decode"] is False


def test_keep_in_fp32_tensors_stay_float32_when_offloaded(tmp_path, one_thread):
    """transformers' disk-offload index forgets ``_keep_in_fp32_modules`` (RWKV's decay and bonus
    in float16); streamed.py restores them, or the greedy tokens would differ (0.125 agreement)."""
    path = _pulled(tmp_path, "rwkv")
    memory = run_parity(path, device="cpu", dtype="float16")
    streamed = _streamed(path, "float16", decode=True)
    for key in METRICS + DECODED:
        assert streamed[key] == memory[key], key


def _mapped(path: Path) -> int:
    """Bytes of ``path``'s model file mapped into this process (the kernel may merge adjacent
    maps into one line of /proc/self/maps, so count bytes, not lines)."""
    target = str((path / "model.safetensors").resolve())
    total = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.rstrip().endswith(target):
            lo, hi = line.split()[0].split("-")
            total += int(hi, 16) - int(lo, 16)
    return total


@pytest.mark.parametrize("name", ["llama-40mb", "rwkv", "mamba-tied", "jamba-sharded"])
def test_each_block_is_mapped_once_per_pass_and_unmapped_after_it(tmp_path, name, one_thread):
    path = _pulled(tmp_path, name)
    um = open_unified(path)
    ours = StreamedModel(um, default_dtype(um.meta), torch.device("cpu"))
    n_layer = um.config["n_layer"]
    seen = []
    for i, block in enumerate(ours.model.layers):  # runs after statecast's loader: the block is mapped now
        block.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, _mapped(path))))
    ids = torch.randint(0, um.config["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), ours.resident() as model:
        resident = _mapped(path)  # the tensors outside the blocks
        assert resident > 0
        model(ids)
        assert ours.loads == n_layer and [i for i, _ in seen] == list(range(n_layer))
        with ours.src as src:
            for i, mapped in seen:  # that block's tensors and nothing else: each map is page-aligned
                keys = ours.block_keys[i]
                nbytes = sum(math.prod(src.shape(k)) * src.dtype(k).itemsize for k in keys)
                assert nbytes <= mapped - resident <= nbytes + 2 * 4096 * len(keys), i
        assert _mapped(path) == resident
    assert ours.is_released() and _mapped(path) == 0
    ours.close()


def test_native_sources_are_refused_in_one_line(tmp_path):
    pth = factories.native_rwkv4(tmp_path / "native")
    path = Path(pull(str(pth), out=tmp_path / "model", progress=False)["path"])
    with pytest.raises(StatecastError, match="without --stream") as e:
        _streamed(path)
    assert "\n" not in str(e.value)


def test_bad_placement_options_are_one_line_errors(tmp_path):
    path = _pulled(tmp_path, "rwkv")
    with pytest.raises(StatecastError, match="with --device-map auto"):
        _streamed(path, max_memory={"cpu": "1GiB"})
    with pytest.raises(StatecastError, match="unknown device map"):
        _streamed(path, device_map="balanced")
    if not torch.cuda.is_available():
        with pytest.raises(StatecastError, match="no CUDA device"):
            _streamed(path, device_map="auto")


def test_max_memory_is_parsed_for_accelerate():
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=100GiB") == {0: "70GiB", 1: "70GiB", "cpu": "100GiB"}
    for bad in ("", "70GiB", "gpu0=1GiB", "0=lots"):
        with pytest.raises(StatecastError, match="--max-memory"):
            parse_max_memory(bad)


def test_verify_wires_the_streamed_mode(tmp_path, one_thread):
    """``run_parity(..., stream=True)`` hands over to streamed_parity."""
    path = _pulled(tmp_path, "rwkv")
    r = run_parity(path, device="cpu", stream=True)
    assert r["passed"] and r["streamed"]["skipped"] == list(SKIPPED_WITHOUT_DECODE)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_streamed_on_one_gpu_matches_in_memory(tmp_path):
    path = _pulled(tmp_path, "llama-40mb")
    memory = run_parity(path, device="cuda")
    um = open_unified(path)
    streamed = streamed_parity(um, Path(um.source["path"]), torch.device("cuda"), default_dtype(um.meta), decode=True)
    assert streamed["passed"]
    for key in ("logit_scale", "top1_agreement", "greedy_agreement"):  # GPU kernels may pick another order
        assert streamed[key] == pytest.approx(memory[key], rel=1e-6), key


@cuda
def test_device_map_auto_places_the_reference_with_accelerate(tmp_path):
    path = _pulled(tmp_path, "llama-40mb")
    um = open_unified(path)
    r = streamed_parity(um, Path(um.source["path"]), torch.device("cuda"), "float32", device_map="auto")
    assert r["passed"] and r["streamed"]["device_map"] == "auto"
    assert "max_memory" in r["reference"]["weights"]


# --------------------------------------------------------------------------- memory

# A child that imports what a verify imports (the model's transformers class included), then
# either stops (baseline) or runs the streamed verify. It reports its RSS after the imports and
# the peak after them: the kernel's high-water mark, reset once imports are done
# (/proc/self/clear_refs "5"). ru_maxrss would not do: it survives fork+exec, so a child of
# this (large) pytest process would report the parent's RSS.
CHILD = r"""
import json, re, sys
from pathlib import Path
import torch
torch.set_num_threads(2)
import accelerate.big_modeling, transformers
from statecast.checkpoints.layout import open_unified
from statecast.parity import streamed, verify
getattr(transformers, sys.argv[3])

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

Path("/proc/self/clear_refs").write_text("5")
out = {"rss_after_imports": status("VmRSS")}
if sys.argv[1] == "stream":
    um = open_unified(sys.argv[2])
    r = streamed.streamed_parity(um, Path(um.source["path"]), torch.device("cpu"), verify.default_dtype(um.meta))
    out.update(passed=r["passed"], nmse_db=r["nmse_db"])
out["peak"] = status("VmHWM")
print(json.dumps(out))
"""


def _child(mode: str, path: Path, arch: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, str(path), arch], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _result(child: subprocess.Popen) -> dict:
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_a_model_four_times_the_memory_increase_is_verified(tmp_path):
    # 40 blocks of 9.6 MB (the Llama shape above): 388 MB of float32 weights
    src = factories.hf_transformer(tmp_path / "src", "llama", hidden=512, layers=40)
    path = Path(pull(str(src), out=tmp_path / "model", progress=False)["path"])
    model_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    # both at once (each process's RSS is its own): the baseline only imports
    baseline, run = _child("imports", path, "LlamaForCausalLM"), _child("stream", path, "LlamaForCausalLM")
    baseline, run = _result(baseline), _result(run)
    increase = run["peak"] - baseline["rss_after_imports"]
    print(f"\nmodel {model_bytes / 1e6:.0f} MB; streamed verify peak RSS +{increase / 1e6:.0f} MB over an import-only "
          f"child ({model_bytes / increase:.1f}x); its own RSS after imports {run['rss_after_imports'] / 1e6:.0f} MB")
    assert run["passed"] and run["nmse_db"] is None  # identical logits
    assert model_bytes >= 4 * increase, (model_bytes, increase)
    assert math.isfinite(increase)
