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

import platform
from pathlib import Path

import torch

from .. import __version__
from ..checkpoints.atomic import check_writable, write_json_atomic, write_text_atomic
from ..checkpoints.layout import check_file_digests, open_unified, verify_tensor_hashes
from ..checkpoints.readers import parse_dtype
from ..convert.generate import generate_ids
from ..convert.loading import load_model, load_tokenizer, resolve_device
from ..errors import ParityFailed, StatecastError
from ..families import FAMILIES, make_reference
from ..families.references import present_hidden
from .metrics import (
    GREEDY_PROMPT,
    GREEDY_TOKENS,
    PARITY_BATCH,
    PARITY_SEED,
    bound_text,
    compare_logits,
    db,
    failed,
    json_metric,
    judge,
    logit_scale,
    ok_text,
    random_ids,
    relative,
    show,
)

# Bounds by the dtype our model computes in (metrics: parity/metrics.py; nmse_db and
# layer_nmse_db are upper bounds, more negative is better; agreements are lower bounds).
# No absolute logit bound: errors are judged against the logits' spread. float32
# calibration: a full-size default-init Mamba (24 x 768, vocab 50280) against transformers
# gives rel_max_abs_diff 2.0e-3 (max_abs_diff 5.6e-3 at logit_scale 2.8), nmse -75.5 dB,
# kl_max 6.4e-7, and its own steps against its parallel path rel 2.4e-3, -70.5 dB (the
# former absolute bounds, max_abs_diff 2e-3 and -80 dB, refused this sane model); the tiny
# test models are below -90 dB. bfloat16 keeps 8 bits of mantissa;
# two correct bfloat16 implementations round in different places. Calibration:
# transformers' own JambaForCausalLM in bfloat16 against itself in float32 on the test
# checkpoints gives kl_max 0.036 and nmse -26.5 dB (a top-k router amplifies rounding: a
# near-tie flips an expert); ours in bfloat16 against it in bfloat16 gives 0.031-0.046 and
# -24.7 to -31.5 dB. The bounds leave about 2x room. A family's record may override a bound.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"rel_max_abs_diff": 1e-2, "nmse_db": -60.0, "kl_max": 1e-5, "top1_agreement": 0.999,
                "greedy_agreement": 1.0, "step_vs_parallel_rel_diff": 1e-2, "layer_nmse_db": -60.0},
    "float16": {"rel_max_abs_diff": 0.25, "nmse_db": -40.0, "kl_max": 5e-3, "top1_agreement": 0.97,
                "greedy_agreement": 0.75, "step_vs_parallel_rel_diff": 0.25, "layer_nmse_db": -35.0},
    "bfloat16": {"rel_max_abs_diff": 1.0, "nmse_db": -20.0, "kl_max": 1e-1, "top1_agreement": 0.9,
                 "greedy_agreement": 0.5, "step_vs_parallel_rel_diff": 1.0, "layer_nmse_db": -22.0},
}
TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905 Albert Einstein published four papers that changed "
    "physics: on the photoelectric effect, Brownian motion, special relativity and the equivalence of mass and energy."
)


def _inputs(vocab: int, tokenizer) -> list[torch.Tensor]:
    batches = [random_ids(vocab)]
    if tokenizer is not None:
        ids = [i for i in tokenizer.encode(TEXT).ids if i < vocab]
        if len(ids) >= 2:
            batches.append(torch.tensor([ids]))
    return batches


def _step_by_step(model, ids: torch.Tensor) -> torch.Tensor:
    state, out = None, []
    for t in range(ids.shape[1]):
        logits, state = model(ids[:, t : t + 1], state)
        out.append(logits)
    return torch.cat(out, 1)


def step_vs_parallel(model, ids: torch.Tensor, parallel: torch.Tensor | None = None):
    """max |logits fed one token per call - logits of the whole sequence| on ``ids``, the
    whole-sequence logits (``parallel``, when already computed, is reused unless it must be
    recomputed) and the rules under which they were compared: where the reference's own step
    and whole-sequence paths differ (``CausalLM.parallel_as_step``), the whole sequence runs
    under the step's rule, so the check measures our step code and nothing else."""
    with model.parallel_as_step() as rules:
        if parallel is None or rules:
            parallel = model(ids)[0].float().cpu()
        diff = float((_step_by_step(model, ids).float().cpu() - parallel).abs().max())
    return diff, parallel, rules


def default_dtype(meta: dict) -> str:
    """float32, unless conversion cast the weights (``pull --dtype``): then the checkpoint's
    dtype, judged by its own tolerances, since the original files hold other values."""
    source_dtype = meta["source"].get("dtype")
    return "float32" if source_dtype is not None and source_dtype == meta["dtype"] else meta["dtype"]


def check_reference_files(um, ref_path: Path, given: bool) -> None:
    """The original files are the ones converted, before any reference implementation reads
    them: each one's digest is compared with the one recorded at conversion (each byte read
    once, files in parallel). With ``--reference`` (the files moved), the weight files found
    there are matched to the recorded ones by name (a lone renamed file by its kind) and
    loaded once through statecast's restricted reader (``weights_only``): a file that differs,
    or a pickle that holds more than tensors, is refused before a loader that unpickles
    (BlinkDL's ``rwkv`` package) sees it."""
    from ..checkpoints.readers import open_tensors, weight_files

    recorded = um.source.get("files", {})
    if not isinstance(recorded, dict):
        raise StatecastError(f"{um.path / 'statecast.json'}: source.files must be an object of file name -> digest")
    root = ref_path if ref_path.is_dir() else ref_path.parent
    if not given:
        check_file_digests(root, recorded, "pass --reference PATH")
        return
    files = weight_files(ref_path)
    if not files:
        raise StatecastError(f"--reference {ref_path}: no weight files (.safetensors, pytorch_model*.bin or .pth) found there")
    matched: dict[str, Path] = {}
    expected: dict[str, str] = {}
    for f in files:
        try:
            name = str(f.relative_to(root))
        except ValueError:
            name = f.name
        if name not in recorded and ref_path.is_file():  # a lone checkpoint file, renamed when it moved
            same_kind = [n for n in recorded if Path(n).suffix == f.suffix]
            name = same_kind[0] if len(same_kind) == 1 else name
        if name not in recorded:
            raise StatecastError(f"--reference {ref_path}: {f.name} is not one of the files this model was converted from "
                                 f"({', '.join(sorted(recorded)) or 'none recorded'})")
        matched[name], expected[name] = f, recorded[name]
    check_file_digests(root, expected, f"--reference {ref_path} is not the checkpoint {um.path} was converted from",
                       files=matched)
    with open_tensors(files):  # the restricted reader refuses a pickle that holds more than tensors
        pass


@torch.inference_mode()
def run_parity(path: str | Path, device: str = "auto", dtype: str | None = None, reference: str | Path | None = None,
               progress=None, kernels: str = "auto", stream: bool = False, device_map: str | None = None,
               max_memory: dict | None = None, decode: bool = False) -> dict:
    """Compute the parity report (no files written). ``stream``: one block of each model in
    memory at a time (:mod:`.streamed`; ``device_map``/``max_memory`` place the reference with
    accelerate and imply it; ``decode`` also runs greedy decoding and step-vs-parallel there)."""
    um = open_unified(path)
    verify_tensor_hashes(um)  # a tampered model is an error before anything is compared
    dev = resolve_device(device)
    src = um.source
    ref_path = Path(reference) if reference else Path(src.get("path", ""))
    if not ref_path.exists():
        raise StatecastError(f"the original files of {um.path} are not at {ref_path} any more; pass --reference PATH")
    check_reference_files(um, ref_path, given=reference is not None)
    step = progress or (lambda msg: None)
    step("loading models")
    ours_dtype = dtype or default_dtype(um.meta)
    tol = tolerances(um.family, ours_dtype)
    if stream or device_map is not None:
        from .streamed import streamed_parity

        return streamed_parity(um, ref_path, dev, ours_dtype, kernels=kernels, progress=step,
                               device_map=device_map, max_memory=max_memory, decode=decode)
    model, _ = load_model(um, dtype=ours_dtype, device=str(dev), kernels=kernels)
    # the reference computes in our dtype: a lower precision is judged against the original
    # implementation in that precision, by that precision's tolerances
    ref = make_reference(src.get("format", ""), ref_path, dev, um.config, parse_dtype(ours_dtype))
    tok = load_tokenizer(um)
    batches = _inputs(um.config["vocab_size"], tok)

    step("comparing logits")
    n_layer = um.config["n_layer"]
    pairs, layer_err, layer_pow = [], [0.0] * n_layer, [0.0] * n_layer
    for ids in batches:
        ours_logits, _, ours_hidden = model(ids.to(dev), output_hidden=True)
        pairs.append((ours_logits.float().cpu(), ref.logits(ids)))
        for i, rh in enumerate(ref.hidden(ids)):
            oh = present_hidden(ours_hidden[i].cpu(), ref.hidden_view).double()
            rh = rh.double()
            layer_err[i] += float((oh - rh).pow(2).sum())
            layer_pow[i] += float(rh.pow(2).sum())
    metrics = compare_logits(pairs)

    step("greedy decoding")
    prompt = batches[-1][0, :GREEDY_PROMPT].tolist()
    ours_greedy = generate_ids(model, prompt, GREEDY_TOKENS)
    ref_greedy = ref.greedy(prompt, GREEDY_TOKENS)
    metrics["greedy_agreement"] = sum(a == b for a, b in zip(ours_greedy, ref_greedy)) / GREEDY_TOKENS

    step("step vs parallel")
    step_diff, parallel, step_rules = step_vs_parallel(model, batches[0].to(dev))
    metrics["step_vs_parallel_max_abs_diff"] = step_diff
    metrics["step_vs_parallel_rel_diff"] = relative(step_diff, logit_scale(parallel))

    reference = {"implementation": ref.implementation, "version": ref.version, "path": str(ref_path),
                 "dtype": str(ref.dtype).removeprefix("torch."), "weights": ref.weights}
    greedy = {"prompt": prompt, "tokens": GREEDY_TOKENS, "ours": ours_greedy, "reference": ref_greedy}
    return build_report(um, reference=reference, device=dev, dtype=ours_dtype, kernels=model.kernels, metrics=metrics,
                        layer_err=layer_err, layer_pow=layer_pow, per_layer_view=ref.hidden_view, tol=tol,
                        batches=batches, greedy=greedy, step_rules=step_rules)


def build_report(um, *, reference: dict, device: torch.device, dtype: str, kernels: str, metrics: dict,
                 layer_err: list[float], layer_pow: list[float], per_layer_view: str, tol: dict, batches: list,
                 greedy: dict | None, step_rules: list[str] = ()) -> dict:
    """The parity report (``parity.json``) from the measured metrics and per-layer error
    sums, judged by ``tol``; shared by the in-memory and the streamed verify. ``step_rules``:
    where the whole sequence ran under the step's rule for the step check (:func:`step_vs_parallel`)."""
    per_layer = [db(e, p) for e, p in zip(layer_err, layer_pow)]
    first_bad = next((i for i, v in enumerate(per_layer) if v > tol["layer_nmse_db"]), None)
    checks = judge(metrics, tol)
    return {
        "passed": all(checks.values()) and first_bad is None,
        "model": str(um.path),
        "family": um.family,
        "source": um.source.get("id"),
        "reference": reference,
        "statecast": __version__,
        "torch": torch.__version__,
        "device": str(device) if device.type == "cpu" else f"cuda ({torch.cuda.get_device_name(device)})",
        "platform": platform.platform(),
        "dtype": dtype,
        "kernels": kernels,
        "checkpoint_dtype": um.meta["dtype"],
        **{k: json_metric(v) for k, v in metrics.items()},
        "inputs": {"random": f"{PARITY_BATCH[0]}x{PARITY_BATCH[1]} seed {PARITY_SEED}",
                   "text_tokens": int(batches[1].shape[1]) if len(batches) > 1 else 0},
        "greedy": greedy,
        "step_vs_parallel_rules": list(step_rules),
        "per_layer": [json_metric(v) for v in per_layer],
        "per_layer_view": per_layer_view,
        "first_divergent_layer": first_bad,
        "checks": checks,
        "tolerances": tol,
    }


# the rows of parity.md's table, in order
REPORTED = ("max_abs_diff", "mean_abs_diff", "logit_scale", "rel_max_abs_diff", "nmse_db", "kl_mean", "kl_max",
            "top1_agreement", "greedy_agreement", "step_vs_parallel_max_abs_diff", "step_vs_parallel_rel_diff")


def tolerances(family: str, dtype: str) -> dict[str, float]:
    """The bounds verify applies: :data:`TOLERANCES` for ``dtype``, with the family record's overrides."""
    if dtype not in TOLERANCES:
        raise StatecastError(f"no parity tolerances for dtype {dtype!r}; choose {', '.join(TOLERANCES)}")
    return {**TOLERANCES[dtype], **FAMILIES[family].tolerances.get(dtype, {})}


def render_markdown(r: dict) -> str:
    tol = r["tolerances"]
    verdict = "PASS" if r["passed"] else "FAIL"
    lines = [
        f"# Parity report: {verdict}",
        "",
        f"- model: `{r['model']}` ({r['family']}, stored {r['checkpoint_dtype']}, computed in {r['dtype']}) from `{r['source']}`",
        f"- reference: {r['reference']['implementation']} {r['reference']['version']} ({r['reference']['dtype']}): {r['reference']['weights']}",
        f"- device: {r['device']}; kernels: {r.get('kernels', 'torch')}; statecast {r['statecast']}, torch {r['torch']}",
        f"- inputs: {r['inputs']['random']} random tokens"
        + (f" + {r['inputs']['text_tokens']} text tokens" if r["inputs"]["text_tokens"] else "")
        + f"; {r['n_positions']} positions",
        "",
        "| metric | value | tolerance | ok |",
        "|---|---|---|---|",
    ]
    for k in REPORTED:
        if k not in r:  # a report written by an older statecast
            continue
        lines.append(f"| {k} | {show(r[k])} | {bound_text(k, tol)} | {ok_text(r['checks'].get(k))} |")
    if r.get("step_vs_parallel_rules"):
        lines += ["", "Steps vs parallel: the whole sequence ran under the step's rule where the reference's two paths "
                  "differ: " + "; ".join(r["step_vs_parallel_rules"])]
    lines += ["", f"Per-layer hidden-state NMSE (dB, {r['per_layer_view']}; tolerance <= {tol['layer_nmse_db']:g}):", ""]
    lines.append("| layer | " + " | ".join(str(i) for i in range(len(r["per_layer"]))) + " |")
    lines.append("|---" * (len(r["per_layer"]) + 1) + "|")
    lines.append("| NMSE dB | " + " | ".join(show(v, ".1f") for v in r["per_layer"]) + " |")
    fdl = r["first_divergent_layer"]
    lines += ["", f"First divergent layer: {'none' if fdl is None else fdl}", ""]
    return "\n".join(lines)


def verify(path: str | Path, device: str = "auto", dtype: str | None = None, reference: str | Path | None = None,
           progress=None, raise_on_fail: bool = True, kernels: str = "auto", stream: bool = False,
           device_map: str | None = None, max_memory: dict | None = None, decode: bool = False) -> dict:
    """Run the parity report, write ``parity.json`` and ``parity.md`` into the model, raise if it fails."""
    if (Path(path) / "statecast.json").is_file():
        check_writable(Path(path), "parity.json")  # a read-only model directory is an error now, not after the comparison
    report = run_parity(path, device=device, dtype=dtype, reference=reference, progress=progress, kernels=kernels,
                        stream=stream, device_map=device_map, max_memory=max_memory, decode=decode)
    out = Path(report["model"])
    markdown = render_markdown(report)  # before writing anything
    write_json_atomic(out / "parity.json", report)  # unique temporary names, os.replace: never seen half-written
    write_text_atomic(out / "parity.md", markdown)
    if raise_on_fail and not report["passed"]:
        bad = failed(report["checks"])
        if report["first_divergent_layer"] is not None:
            bad.append(f"layer {report['first_divergent_layer']} diverges")
        raise ParityFailed(f"parity FAILED for {out}: {', '.join(bad)} (see {out / 'parity.md'})")
    return report
