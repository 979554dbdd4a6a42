"""``convert verify``: parity against transformers (Hub format) and BlinkDL's rwkv package (native .pth)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from statecast.convert.pull import pull
from statecast.errors import ParityFailed, StatecastError
from statecast.parity.verify import TOLERANCES, verify

REQUIRED = {"passed", "reference", "device", "dtype", "max_abs_diff", "mean_abs_diff", "nmse_db", "kl_mean", "kl_max",
            "top1_agreement", "greedy_agreement", "step_vs_parallel_max_abs_diff", "per_layer", "first_divergent_layer"}


def test_hf_source_passes_against_transformers(pulled_hf, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(pulled_hf, model)
    r = verify(model, device="cpu")
    assert REQUIRED <= r.keys()
    assert r["passed"] and r["reference"]["implementation"] == "transformers.RwkvForCausalLM"
    assert r["device"] == "cpu" and r["dtype"] == "float32"
    assert r["max_abs_diff"] < 1e-4 and (r["nmse_db"] or -math.inf) < -100 and r["kl_max"] < 1e-9
    assert r["top1_agreement"] == 1.0 and r["greedy_agreement"] == 1.0 and r["greedy"]["tokens"] >= 32
    assert r["step_vs_parallel_max_abs_diff"] < 1e-4
    assert len(r["per_layer"]) == 3 and all((v or -math.inf) < -100 for v in r["per_layer"]) and r["first_divergent_layer"] is None
    assert r["n_positions"] >= 2 * 64 + r["inputs"]["text_tokens"] and r["inputs"]["text_tokens"] > 0
    on_disk = json.loads((model / "parity.json").read_text())
    assert on_disk["passed"] and on_disk["max_abs_diff"] == r["max_abs_diff"]
    assert "PASS" in (model / "parity.md").read_text()


def test_native_source_passes_against_rwkv_package(native_pth, tmp_path):
    info = pull(str(native_pth), out=tmp_path / "m", progress=False)
    r = verify(info["path"], device="cpu")
    assert r["passed"], r["checks"]
    assert r["reference"]["implementation"] == "rwkv.model.RWKV" and r["per_layer_view"] == "layer_norm"
    assert r["max_abs_diff"] < 1e-4 and r["greedy_agreement"] == 1.0 and len(r["per_layer"]) == 3


def test_float16_model_meets_float16_tolerances(hf_dir, tmp_path):
    info = pull(str(hf_dir), out=tmp_path / "m", dtype="float16", progress=False)
    r = verify(info["path"], device="cpu")
    assert r["dtype"] == "float16" and r["tolerances"] == TOLERANCES["float16"]
    assert r["passed"], r["checks"]
    assert 0 < r["rel_max_abs_diff"] < TOLERANCES["float16"]["rel_max_abs_diff"]


def test_a_perturbed_layer_fails_and_is_named(pulled_hf, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(pulled_hf, model)
    sd = load_file(model / "model.safetensors")
    sd["layers.1.mlp.down.weight"] = sd["layers.1.mlp.down.weight"] * 1.05
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    # a wrong conversion, not tampering: the manifest records the new bytes
    meta = json.loads((model / "statecast.json").read_text())
    t = sd["layers.1.mlp.down.weight"]
    meta["tensors"]["layers.1.mlp.down.weight"]["sha256"] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()
    (model / "statecast.json").write_text(json.dumps(meta))
    with pytest.raises(ParityFailed, match="layer 1 diverges"):
        verify(model, device="cpu")
    r = json.loads((model / "parity.json").read_text())
    assert not r["passed"] and r["first_divergent_layer"] == 1
    assert r["per_layer"][0] < -100 and r["per_layer"][1] > -60


def test_moved_original_needs_reference(hf_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    info = pull(str(src), out=tmp_path / "m", progress=False)
    moved = tmp_path / "moved"
    src.rename(moved)
    with pytest.raises(StatecastError, match="pass --reference"):
        verify(info["path"], device="cpu")
    assert verify(info["path"], device="cpu", reference=moved)["passed"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_parity(pulled_hf, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(pulled_hf, model)
    r = verify(model, device="cuda")
    assert r["passed"] and r["device"].startswith("cuda")


def test_metrics_are_judged_relative_to_the_logits_and_identical_outputs_read_exact():
    """One judging code for verify and the ONNX check: bounds relative to the logits' spread,
    so the same relative error passes at any logit scale; identical logits have an NMSE of
    -inf, which parity.json holds as null and people read as "exact"."""
    from statecast.parity.metrics import compare_logits, json_metric, judge, show

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 8, 50, generator=g)
    noise = torch.randn(2, 8, 50, generator=g) * 1e-4
    bounds = {"rel_max_abs_diff": 1e-2, "nmse_db": -60.0, "kl_max": 1e-5, "top1_agreement": 0.999}
    for scale in (1.0, 1000.0):  # an absolute bound would refuse the large-logit model
        m = compare_logits([(ref * scale + noise * scale, ref * scale)])
        assert m["logit_scale"] == pytest.approx(scale, rel=0.1)
        assert m["rel_max_abs_diff"] == pytest.approx(m["max_abs_diff"] / m["logit_scale"])
        assert all(judge(m, bounds).values()), (scale, m)
    assert not judge(compare_logits([(ref + 0.5, ref.flip(-1))]), bounds)["top1_agreement"]
    same = compare_logits([(ref, ref)])
    assert same["nmse_db"] == -math.inf and json_metric(same["nmse_db"]) is None and show(None) == "exact"
    assert json.loads(json.dumps({k: json_metric(v) for k, v in same.items()}))["nmse_db"] is None
    nan = compare_logits([(ref * float("nan"), ref)])
    assert not judge(nan, bounds)["finite"]
