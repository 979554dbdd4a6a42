"""``convert verify``: the parity report of a converted model against the original implementation.

Same inputs, same device, on both sides: a fixed batch of random token sequences
(2 x 64, seeded) plus encoded English text when the model has a tokenizer, and the same
precision: both run in float32 unless ``--dtype`` says otherwise (a bfloat16 or float16
source is upcast exactly, so both sides compute the same function in float32) or the
conversion itself cast the weights (then in the cast dtype). In a lower precision the
reference runs in it too (BlinkDL's ``rwkv`` package stays float32) and that dtype's
tolerances apply. Metrics are over all positions; the pass/fail thresholds live in one
table, :data:`TOLERANCES`, keyed by the dtype our model computes in.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import __version__
from ..checkpoints.layout import open_unified, sha256_file, write_json_atomic
from ..checkpoints.readers import parse_dtype
from ..convert.generate import generate_ids
from ..convert.loading import load_model, load_tokenizer, resolve_device
from ..errors import ParityFailed, StatecastError
from ..families import make_reference
from ..families.references import present_hidden

# Thresholds by the dtype our model computes in. nmse_db and layer_nmse_db are
# upper bounds (more negative is better); agreements are lower bounds (0..1).
# bfloat16 keeps 8 bits of mantissa; two correct bfloat16 implementations round in
# different places. Calibration: transformers' own JambaForCausalLM in bfloat16 against
# itself in float32 on the test checkpoints gives kl_max 0.036 and nmse -26.5 dB (a top-k
# router amplifies rounding: a near-tie flips an expert); ours in bfloat16 against it in
# bfloat16 gives 0.031-0.046 and -24.7 to -31.5 dB. The bounds leave about 2x room.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"max_abs_diff": 2e-3, "nmse_db": -80.0, "kl_max": 1e-6, "top1_agreement": 0.999,
                "greedy_agreement": 1.0, "step_vs_parallel_max_abs_diff": 2e-3, "layer_nmse_db": -70.0},
    "float16": {"max_abs_diff": 0.25, "nmse_db": -40.0, "kl_max": 5e-3, "top1_agreement": 0.97,
                "greedy_agreement": 0.75, "step_vs_parallel_max_abs_diff": 0.25, "layer_nmse_db": -35.0},
    "bfloat16": {"max_abs_diff": 1.0, "nmse_db": -20.0, "kl_max": 1e-1, "top1_agreement": 0.9,
                 "greedy_agreement": 0.5, "step_vs_parallel_max_abs_diff": 1.0, "layer_nmse_db": -22.0},
}
UPPER = ("max_abs_diff", "nmse_db", "kl_max", "step_vs_parallel_max_abs_diff")
LOWER = ("top1_agreement", "greedy_agreement")

N_SEQ, SEQ_LEN, SEED = 2, 64, 1234
GREEDY_TOKENS, GREEDY_PROMPT = 32, 8
TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905 Albert Einstein published four papers that changed "
    "physics: on the photoelectric effect, Brownian motion, special relativity and the equivalence of mass and energy."
)


def nmse_db(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """10 log10(||ours - ref||^2 / ||ref||^2); -inf when identical."""
    err = (ours.double() - ref.double()).pow(2).sum()
    power = ref.double().pow(2).sum().clamp_min(1e-300)
    return -math.inf if err == 0 else float(10 * torch.log10(err / power))


def kl_per_position(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p_ours) at every position, float64."""
    lr = F.log_softmax(ref.double(), -1)
    lo = F.log_softmax(ours.double(), -1)
    return (lr.exp() * (lr - lo)).sum(-1).clamp_min(0)


def _inputs(vocab: int, tokenizer) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    batches = [torch.randint(0, vocab, (N_SEQ, SEQ_LEN), generator=gen)]
    if tokenizer is not None:
        ids = [i for i in tokenizer.encode(TEXT).ids if i < vocab]
        if len(ids) >= 2:
            batches.append(torch.tensor([ids]))
    return batches


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else (x if math.isfinite(x) else (-1e9 if x < 0 else 1e9))


def _step_by_step(model, ids: torch.Tensor) -> torch.Tensor:
    state, out = None, []
    for t in range(ids.shape[1]):
        logits, state = model(ids[:, t : t + 1], state)
        out.append(logits)
    return torch.cat(out, 1)


def default_dtype(meta: dict) -> str:
    """float32, unless conversion cast the weights (``pull --dtype``): then the checkpoint's
    dtype, judged by its own tolerances, since the original files hold other values."""
    source_dtype = meta["source"].get("dtype")
    return "float32" if source_dtype is not None and source_dtype == meta["dtype"] else meta["dtype"]


@torch.inference_mode()
def run_parity(path: str | Path, device: str = "auto", dtype: str | None = None, reference: str | Path | None = None,
               progress=None, kernels: str = "torch") -> dict:
    """Compute the parity report (no files written)."""
    um = open_unified(path)
    dev = resolve_device(device)
    src = um.source
    ref_path = Path(reference) if reference else Path(src.get("path", ""))
    if not ref_path.exists():
        raise StatecastError(f"the original files of {um.path} are not at {ref_path} any more; pass --reference PATH")
    if reference is None:
        root = ref_path if ref_path.is_dir() else ref_path.parent
        for name, digest in src.get("files", {}).items():
            f = root / name
            if not f.is_file() or sha256_file(f) != digest:
                raise StatecastError(f"the original file {f} is missing or changed since conversion; pass --reference PATH")
    step = progress or (lambda msg: None)
    step("loading models")
    ours_dtype = dtype or default_dtype(um.meta)
    if ours_dtype not in TOLERANCES:
        raise StatecastError(f"no parity tolerances for dtype {ours_dtype!r}; choose {', '.join(TOLERANCES)}")
    model, _ = load_model(um, dtype=ours_dtype, device=str(dev), kernels=kernels)
    tol = TOLERANCES[ours_dtype]
    # the reference computes in our dtype: a lower precision is judged against the original
    # implementation in that precision, by that precision's tolerances
    ref = make_reference(src.get("format", ""), ref_path, dev, um.config, parse_dtype(ours_dtype))
    tok = load_tokenizer(um)
    batches = _inputs(um.config["vocab_size"], tok)

    step("comparing logits")
    diffs, sq_err, sq_ref, kls, top1, n_pos, n_layer = [], 0.0, 0.0, [], [], 0, um.config["n_layer"]
    layer_err = [0.0] * n_layer
    layer_pow = [0.0] * n_layer
    for ids in batches:
        ours_logits, _, ours_hidden = model(ids.to(dev), output_hidden=True)
        ours_logits = ours_logits.float().cpu()
        ref_logits = ref.logits(ids)
        d = (ours_logits.double() - ref_logits.double())
        diffs.append(d.abs())
        sq_err += float(d.pow(2).sum())
        sq_ref += float(ref_logits.double().pow(2).sum())
        kls.append(kl_per_position(ours_logits, ref_logits).flatten())
        top1.append((ours_logits.argmax(-1) == ref_logits.argmax(-1)).flatten())
        n_pos += ids.numel()
        for i, rh in enumerate(ref.hidden(ids)):
            oh = present_hidden(ours_hidden[i].cpu(), ref.hidden_view).double()
            rh = rh.double()
            layer_err[i] += float((oh - rh).pow(2).sum())
            layer_pow[i] += float(rh.pow(2).sum())

    step("greedy decoding")
    prompt = batches[-1][0, :GREEDY_PROMPT].tolist()
    ours_greedy = generate_ids(model, prompt, GREEDY_TOKENS)
    ref_greedy = ref.greedy(prompt, GREEDY_TOKENS)
    greedy = sum(a == b for a, b in zip(ours_greedy, ref_greedy)) / GREEDY_TOKENS

    step("step vs parallel")
    ids = batches[0].to(dev)
    step_diff = float((_step_by_step(model, ids).float() - model(ids)[0].float()).abs().max())

    all_diff = torch.cat([x.flatten() for x in diffs])
    kl = torch.cat(kls)
    per_layer = [(-math.inf if e == 0 else 10 * math.log10(e / max(p, 1e-300))) for e, p in zip(layer_err, layer_pow)]
    first_bad = next((i for i, v in enumerate(per_layer) if v > tol["layer_nmse_db"]), None)
    metrics = {
        "max_abs_diff": float(all_diff.max()),
        "mean_abs_diff": float(all_diff.mean()),
        "nmse_db": -math.inf if sq_err == 0 else 10 * math.log10(sq_err / max(sq_ref, 1e-300)),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float(torch.cat(top1).double().mean()),
        "greedy_agreement": greedy,
        "step_vs_parallel_max_abs_diff": step_diff,
    }
    checks = {k: (metrics[k] <= tol[k] if k in UPPER else metrics[k] >= tol[k]) for k in UPPER + LOWER}
    checks["finite"] = all(math.isfinite(metrics[k]) for k in ("max_abs_diff", "mean_abs_diff", "kl_max"))
    return {
        "passed": all(checks.values()) and first_bad is None,
        "model": str(um.path),
        "family": um.family,
        "source": src.get("id"),
        "reference": {"implementation": ref.implementation, "version": ref.version, "path": str(ref_path),
                      "dtype": str(ref.dtype).removeprefix("torch."),
                      "weights": ref.weights},
        "statecast": __version__,
        "torch": torch.__version__,
        "device": str(dev) if dev.type == "cpu" else f"cuda ({torch.cuda.get_device_name(dev)})",
        "platform": platform.platform(),
        "dtype": ours_dtype,
        "kernels": kernels,
        "checkpoint_dtype": um.meta["dtype"],
        **{k: _json_float(v) if isinstance(v, float) else v for k, v in metrics.items()},
        "n_positions": n_pos,
        "inputs": {"random": f"{N_SEQ}x{SEQ_LEN} seed {SEED}", "text_tokens": int(batches[1].shape[1]) if len(batches) > 1 else 0},
        "greedy": {"prompt": prompt, "tokens": GREEDY_TOKENS, "ours": ours_greedy, "reference": ref_greedy},
        "per_layer": [_json_float(v) for v in per_layer],
        "per_layer_view": ref.hidden_view,
        "first_divergent_layer": first_bad,
        "checks": checks,
        "tolerances": tol,
    }


def render_markdown(r: dict) -> str:
    tol = r["tolerances"]
    verdict = "PASS" if r["passed"] else "FAIL"
    lines = [
        f"# Parity report: {verdict}",
        "",
        f"- model: `{r['model']}` ({r['family']}, stored {r['checkpoint_dtype']}, computed in {r['dtype']}) from `{r['source']}`",
        f"- reference: {r['reference']['implementation']} {r['reference']['version']} ({r['reference']['dtype']}): {r['reference']['weights']}",
        f"- device: {r['device']}, {r.get('kernels', 'torch')} kernels; statecast {r['statecast']}, torch {r['torch']}",
        f"- inputs: {r['inputs']['random']} random tokens"
        + (f" + {r['inputs']['text_tokens']} text tokens" if r["inputs"]["text_tokens"] else "")
        + f"; {r['n_positions']} positions",
        "",
        "| metric | value | tolerance | ok |",
        "|---|---|---|---|",
    ]
    for k in ("max_abs_diff", "mean_abs_diff", "nmse_db", "kl_mean", "kl_max", "top1_agreement", "greedy_agreement",
              "step_vs_parallel_max_abs_diff"):
        bound = ("<= " if k in UPPER else ">= ") + f"{tol[k]:g}" if k in tol else ""
        ok = {True: "yes", False: "**no**"}.get(r["checks"].get(k), "")
        lines.append(f"| {k} | {r[k]:.4g} | {bound} | {ok} |")
    lines += ["", f"Per-layer hidden-state NMSE (dB, {r['per_layer_view']}; tolerance <= {tol['layer_nmse_db']:g}):", ""]
    lines.append("| layer | " + " | ".join(str(i) for i in range(len(r["per_layer"]))) + " |")
    lines.append("|---" * (len(r["per_layer"]) + 1) + "|")
    lines.append("| NMSE dB | " + " | ".join(f"{v:.1f}" for v in r["per_layer"]) + " |")
    fdl = r["first_divergent_layer"]
    lines += ["", f"First divergent layer: {'none' if fdl is None else fdl}", ""]
    return "\n".join(lines)


def verify(path: str | Path, device: str = "auto", dtype: str | None = None, reference: str | Path | None = None,
           progress=None, raise_on_fail: bool = True, kernels: str = "torch") -> dict:
    """Run the parity report, write ``parity.json`` and ``parity.md`` into the model, raise if it fails."""
    report = run_parity(path, device=device, dtype=dtype, reference=reference, progress=progress, kernels=kernels)
    out = Path(report["model"])
    write_json_atomic(out / "parity.json", report)
    (out / ".parity.md.tmp").write_text(render_markdown(report))
    (out / ".parity.md.tmp").replace(out / "parity.md")
    if raise_on_fail and not report["passed"]:
        failed = [k for k, ok in report["checks"].items() if not ok]
        if report["first_divergent_layer"] is not None:
            failed.append(f"layer {report['first_divergent_layer']} diverges")
        raise ParityFailed(f"parity FAILED for {out}: {', '.join(failed)} (see {out / 'parity.md'})")
    return report
