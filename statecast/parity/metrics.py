"""Parity metrics and their judging, in one place: ``verify`` (ours against the original
implementation) and the ONNX export's check (onnxruntime against ours) both use them.

Logits are compared over all positions of [B, T, V] tensors. Every gate scales with the
logits, so a sane full-size model is not refused for the size of its logits:

    max_abs_diff       max |ours - ref|                         recorded; judged only where a table asks
    logit_scale        RMS over positions of std_V(ref)         the logits' spread (softmax ignores shifts)
    rel_max_abs_diff   max_abs_diff / logit_scale               the worst logit error, in units of that spread
    nmse_db            10 log10(sum (ours - ref)^2 / sum ref^2) None in JSON when identical ("exact" in text)
    kl_mean / kl_max   KL(p_ref || p_ours) per position, nats
    top1_agreement     argmax equal, fraction of positions

A bound table maps a metric name to a bound: an upper bound for the names in :data:`UPPER`,
a lower bound for :data:`LOWER`; None records the metric without judging it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

UPPER = ("max_abs_diff", "rel_max_abs_diff", "nmse_db", "kl_mean", "kl_max", "step_vs_parallel_rel_diff")
LOWER = ("top1_agreement", "greedy_agreement")
FINITE = ("max_abs_diff", "mean_abs_diff", "kl_mean", "kl_max")  # NaN/inf here fails the "finite" check

# the inputs both checks feed: a fixed random [B, T] batch, and a greedy continuation of a prompt
PARITY_BATCH, PARITY_SEED = (2, 64), 1234
GREEDY_PROMPT, GREEDY_TOKENS = 8, 32


def random_ids(vocab: int) -> torch.Tensor:
    """The fixed random [B, T] token batch (:data:`PARITY_BATCH`, seed :data:`PARITY_SEED`)."""
    return torch.randint(0, vocab, PARITY_BATCH, generator=torch.Generator().manual_seed(PARITY_SEED))


def kl_per_position(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p_ours) at every position, float64."""
    lr = F.log_softmax(ref.double(), -1)
    lo = F.log_softmax(ours.double(), -1)
    return (lr.exp() * (lr - lo)).sum(-1).clamp_min(0)


def db(err: float, power: float) -> float:
    """10 log10(err / power); -inf when ``err`` is 0 (identical)."""
    return -math.inf if err == 0 else 10 * math.log10(err / max(power, 1e-300))


def nmse_db(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """10 log10(||ours - ref||^2 / ||ref||^2); -inf when identical."""
    return db(float((ours.double() - ref.double()).pow(2).sum()), float(ref.double().pow(2).sum()))


def logit_scale(ref: torch.Tensor) -> float:
    """The spread of [..., V] logits: the RMS over positions of their standard deviation over V
    (centred per position, since a softmax ignores a shift)."""
    r = ref.double()
    return float((r - r.mean(-1, keepdim=True)).pow(2).mean().sqrt())


def relative(diff: float, scale: float) -> float:
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def compare_logits(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The metrics of the module docstring over every position of every (ours, ref) pair of
    [B, T, V] logits (the pairs may differ in B and T)."""
    diffs, kls, top1 = [], [], []
    sq_err = sq_ref = 0.0
    centred_sq, n_pos = 0.0, 0
    for ours, ref in pairs:
        d = ours.double() - ref.double()
        diffs.append(d.abs().flatten())
        sq_err += float(d.pow(2).sum())
        sq_ref += float(ref.double().pow(2).sum())
        centred_sq += logit_scale(ref) ** 2 * ref[..., 0].numel()
        kls.append(kl_per_position(ours, ref).flatten())
        top1.append((ours.argmax(-1) == ref.argmax(-1)).flatten())
        n_pos += ref[..., 0].numel()
    diff, kl = torch.cat(diffs), torch.cat(kls)
    scale = math.sqrt(centred_sq / n_pos)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_scale": scale,
        "rel_max_abs_diff": relative(float(diff.max()), scale),
        "nmse_db": db(sq_err, sq_ref),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float(torch.cat(top1).double().mean()),
        "n_positions": n_pos,
    }


def judge(metrics: dict, bounds: dict[str, float | None]) -> dict[str, bool]:
    """{metric: within its bound} for every bound that is set, plus ``finite``. A NaN metric
    fails its bound (every comparison with NaN is false)."""
    checks = {k: metrics[k] <= v for k, v in bounds.items() if k in UPPER and v is not None and k in metrics}
    checks.update({k: metrics[k] >= v for k, v in bounds.items() if k in LOWER and v is not None and k in metrics})
    checks["finite"] = all(math.isfinite(metrics[k]) for k in FINITE if k in metrics)
    return checks


def failed(checks: dict[str, bool]) -> list[str]:
    return [k for k, ok in checks.items() if not ok]


def json_metric(x):
    """A metric as JSON can hold it: a float that is not finite becomes None (null). For an
    NMSE, None means identical outputs (-inf dB; printed "exact"); anywhere else a None metric
    is NaN or infinite, and the report's ``finite`` check has failed."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def show(x, fmt: str = ".4g", exact: str = "exact") -> str:
    """A metric for people: None / -inf (identical outputs) as ``exact``."""
    if x is None or (isinstance(x, float) and x == -math.inf):
        return exact
    return format(x, fmt)


def bound_text(name: str, bounds: dict) -> str:
    """``<= 0.01`` / ``>= 0.999`` for a bounded metric, empty for a recorded one."""
    if bounds.get(name) is None:
        return ""
    return ("<= " if name in UPPER else ">= ") + f"{bounds[name]:g}"


def ok_text(ok: bool | None) -> str:
    return {True: "yes", False: "**no**"}.get(ok, "")
