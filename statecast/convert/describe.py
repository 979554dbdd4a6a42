"""``convert inspect``: what a unified model or a source checkpoint holds."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..checkpoints.layout import is_unified, open_unified
from ..checkpoints.readers import dtype_name, open_tensors
from ..families import detect


def inspect_path(path: str | Path) -> dict:
    path = Path(path)
    if is_unified(path):
        um = open_unified(path)
        parity = json.loads((path / "parity.json").read_text()) if (path / "parity.json").is_file() else None
        return {
            "kind": "unified",
            "path": str(path),
            "family": um.family,
            "dtype": um.meta["dtype"],
            "n_params": um.meta["n_params"],
            "config": um.config,
            "source": {k: um.source.get(k) for k in ("id", "kind", "format", "revision", "sha")},
            "weights": um.meta["weights"],
            "tokenizer": um.meta.get("tokenizer", []),
            "n_tensors": len(um.meta["tensors"]),
            "parity": None if parity is None else {k: parity.get(k) for k in ("passed", "max_abs_diff", "nmse_db", "kl_max", "top1_agreement", "greedy_agreement")},
            "onnx": sorted(p.name for p in (path / "onnx").glob("*.onnx")) if (path / "onnx").is_dir() else [],
        }
    det = detect(path)
    with open_tensors(det.files) as src:
        n = sum(math.prod(src.shape(k)) for k in src.keys())
        dtypes = sorted({dtype_name(src.dtype(k)) for k in src.keys()})
        n_tensors = len(src.keys())
    return {
        "kind": "source",
        "path": str(path),
        "family": det.family.name,
        "format": det.fmt.name,
        "architecture": det.arch.architecture if det.arch else None,
        "files": [str(f) for f in det.files],
        "n_tensors": n_tensors,
        "n_params": n,
        "dtypes": dtypes,
        "tokenizer": sorted(det.tokenizer),
    }


def render(info: dict) -> str:
    lines = [f"{info['path']}", f"  kind:      {info['kind']}", f"  family:    {info['family']}"]
    if info["kind"] == "unified":
        per_layer = ("layer_kinds", "ffn_kinds")
        cfg = ", ".join(f"{k}={v}" for k, v in info["config"].items() if k not in per_layer)
        src = info["source"]
        kinds = info["config"].get("layer_kinds", [])
        lines += [
            f"  layers:    {len(kinds)} (" + "; ".join(_counts(info["config"].get(k)) for k in per_layer if k in info["config"]) + ")",
            *([f"  layout:    {_layout(info['config'])}"] if "ffn_kinds" in info["config"] else []),
            f"  dtype:     {info['dtype']}",
            f"  params:    {info['n_params']:,} in {info['n_tensors']} tensors ({', '.join(info['weights'])})",
            f"  config:    {cfg}",
            f"  source:    {src['id']} ({src['format']}" + (f", {src['revision']} @ {src['sha'][:12]}" if src.get("sha") else "") + ")",
            f"  tokenizer: {', '.join(info['tokenizer']) or 'none'}",
        ]
        p = info["parity"]
        lines.append("  parity:    " + ("not verified" if p is None else
                     f"{'PASS' if p['passed'] else 'FAIL'} (max |diff| {p['max_abs_diff']:.3g}, NMSE {_db(p['nmse_db'])}, top-1 {p['top1_agreement']:.3f})"))
    else:
        lines += [
            f"  format:    {info['format']}" + (f" ({info['architecture']})" if info["architecture"] else ""),
            f"  params:    {info['n_params']:,} in {info['n_tensors']} tensors ({', '.join(info['dtypes'])})",
            f"  files:     {', '.join(info['files'][:4])}" + (f" (+{len(info['files']) - 4} more)" if len(info["files"]) > 4 else ""),
            f"  tokenizer: {', '.join(info['tokenizer']) or 'none'}",
        ]
    return "\n".join(lines)


def _db(nmse: float | None) -> str:
    """parity.json's NMSE: None means identical outputs (see parity/metrics.py)."""
    return "exact" if nmse is None else f"{nmse:.1f} dB"


def _counts(kinds: list[str]) -> str:
    return ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))


# one letter per layer kind, for a hybrid's layout line: "M A M M A M" / "- E - E - E"
_LETTERS = {"mamba": "M", "attention": "A", "mlp": "-", "moe": "E"}


def _layout(cfg: dict) -> str:
    mixers = " ".join(_LETTERS[k] for k in cfg["layer_kinds"])
    ffn = " ".join(_LETTERS[k] for k in cfg["ffn_kinds"])
    return f"{mixers}  (A attention, M Mamba) / {ffn}  (E experts, - dense MLP)"
