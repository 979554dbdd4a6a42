"""``convert inspect``: what a unified model or a source checkpoint holds; ``--check``
compares every tensor with its manifest sha256."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..arch.layers import KIND_LETTERS
from ..checkpoints.layout import META_FILE, UnifiedModel, is_unified, open_unified, verify_tensor_hashes
from ..checkpoints.readers import dtype_name, open_tensors
from ..checkpoints.store import PARITY_FILE, read_parity
from ..errors import StatecastError
from ..families import FAMILIES, detect

PARITY_KEYS = ("passed", "max_abs_diff", "nmse_db", "kl_max", "top1_agreement", "greedy_agreement")


def check_model(um: UnifiedModel) -> None:
    """The checks of a unified model that need its family (beyond :func:`open_unified`'s): the
    family is known and the manifest holds exactly the tensors, with the shapes, that the
    family's model has for the recorded config (a config of 3 layers beside weights of 2 is
    an error naming the first tensor that differs)."""
    where = um.path / META_FILE
    fam = FAMILIES.get(um.family)
    if fam is None:
        raise StatecastError(f"{where}: unknown family {um.family!r:.60}; expected one of {', '.join(FAMILIES)}")
    try:
        expected = fam.expected_shapes(um.config)
    except Exception as e:  # a config the model class refuses: any exception, named in one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise StatecastError(f"{where}: config does not describe a {um.family} model ({first})") from None
    manifest = {n: list(e["shape"]) for n, e in um.meta["tensors"].items()}
    need = {n: list(shape) for n, shape in expected.items()}
    differs = [n for n in [*need, *manifest] if manifest.get(n) != need.get(n)]  # the config's tensors first
    if differs:
        name, cfg = differs[0], _config_line(um.config)
        have, want = manifest.get(name), need.get(name)
        if have is None:
            why = f"the config ({cfg}) needs tensor {name!r}, which the manifest does not have"
        elif want is None:
            why = f"the manifest has tensor {name!r}, which the config ({cfg}) does not need"
        else:
            why = f"tensor {name!r} is {have} in the manifest, the config ({cfg}) needs {want}"
        raise StatecastError(f"{where}: {why}")


def _config_line(cfg: dict) -> str:
    keys = [k for k in ("n_layer", "d_model", "vocab_size") if k in cfg]
    return ", ".join(f"{k} {cfg[k]}" for k in keys) or "as recorded"


def check_unified(path: str | Path, progress=None) -> UnifiedModel:
    """``convert inspect --check``: the cheap checks, the family's shapes, and the sha256 of
    every tensor (one read of each weight file, tensors hashed in parallel)."""
    um = open_unified(path)
    check_model(um)
    verify_tensor_hashes(um, progress=progress)
    return um


def _parity_summary(path: Path) -> dict | None:
    """parity.json's headline metrics; ``{"status": "parity.json unreadable"}`` when it cannot
    be read (empty, corrupt, not an object), never an exception."""
    passed, status = read_parity(path)
    if status == "not verified":
        return None
    try:
        report = json.loads((path / PARITY_FILE).read_bytes().decode("utf-8")) if passed is not None else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # replaced meanwhile by a broken one
        report, status = None, f"{PARITY_FILE} unreadable"
    if not isinstance(report, dict):
        return {"passed": None, "status": status}
    return {**{k: report.get(k) for k in PARITY_KEYS}, "status": status}


def inspect_path(path: str | Path, check: bool = False) -> dict:
    """Describe a unified model or a source checkpoint. ``check`` (``inspect --check``, unified
    models): also compare every tensor with its manifest sha256 (an error naming the tensor
    and the file when one differs); the result then says ``"integrity": "ok"``."""
    path = Path(path)
    if is_unified(path):
        um = check_unified(path) if check else open_unified(path)
        if not check:
            check_model(um)
        info = {
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
            "parity": _parity_summary(path),
            "onnx": sorted(p.name for p in (path / "onnx").glob("*.onnx")) if (path / "onnx").is_dir() else [],
        }
        if check:
            info["integrity"] = "ok"
        return info
    if check:
        raise StatecastError(f"{path}: --check applies to a converted model (a directory with {META_FILE}); "
                             f"this is a source checkpoint")
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
        lines.append("  parity:    " + _parity_line(info["parity"]))
        if "integrity" in info:
            lines.append(f"  integrity: {info['integrity']} (every tensor matches its sha256)")
    else:
        lines += [
            f"  format:    {info['format']}" + (f" ({info['architecture']})" if info["architecture"] else ""),
            f"  params:    {info['n_params']:,} in {info['n_tensors']} tensors ({', '.join(info['dtypes'])})",
            f"  files:     {', '.join(info['files'][:4])}" + (f" (+{len(info['files']) - 4} more)" if len(info["files"]) > 4 else ""),
            f"  tokenizer: {', '.join(info['tokenizer']) or 'none'}",
        ]
    return "\n".join(lines)


def _parity_line(p: dict | None) -> str:
    if p is None:
        return "not verified"
    if p.get("passed") is None:
        return p.get("status", f"{PARITY_FILE} unreadable")
    return (f"{'PASS' if p['passed'] else 'FAIL'} (max |diff| {_num(p.get('max_abs_diff'), '.3g')}, "
            f"NMSE {_db(p.get('nmse_db'))}, top-1 {_num(p.get('top1_agreement'), '.3f')})")


def _num(x, fmt: str) -> str:
    """A metric from parity.json: None (NaN or Inf when it was written) or a wrong type reads as n/a."""
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"


def _db(nmse: float | None) -> str:
    """parity.json's NMSE: None means identical outputs (see parity/metrics.py)."""
    if nmse is None:
        return "exact"
    return f"{nmse:.1f} dB" if isinstance(nmse, (int, float)) and not isinstance(nmse, bool) else "n/a"


def _counts(kinds: list[str]) -> str:
    return ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))


def _layout(cfg: dict) -> str:
    mixers = " ".join(KIND_LETTERS[k] for k in cfg["layer_kinds"])
    ffn = " ".join(KIND_LETTERS[k] for k in cfg["ffn_kinds"])
    return f"{mixers}  (A attention, M Mamba) / {ffn}  (E experts, - dense MLP)"
