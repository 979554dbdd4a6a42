"""``convert export --format hf``: the unified layout back to Hugging Face format.

The HF table of the source's architecture read backwards: canonical name -> HF key, with each
transform's inverse. Tensor bytes are unchanged, so HF -> unified -> HF
round-trips exactly. (ONNX export is a separate module.)
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

from ..checkpoints.layout import PlannedTensor, atomic_directory, open_unified, write_weights
from ..errors import StatecastError
from .families import format_by_name
from .tables import TRANSFORMS, group_by_source, unstack

EXPORT_FORMATS = ("hf", "onnx")


def export_hf(model_path: str | Path, out: str | Path, force: bool = False) -> dict:
    um = open_unified(model_path)
    fam, arch, fmt = format_by_name(um.source.get("format", ""))
    base = um.source.get("hf_config")
    if arch is None:  # a native source: write the family's Hub architecture, from scratch
        arch = fam.arch(fam.native.export_as)
        fmt, base = arch.formats[0], None
    cfg = arch.hf_config(um.config, base)
    out = Path(out).absolute()
    with um.tensors() as tensors, atomic_directory(out, force=force) as tmp:
        plan = []
        for key, names, transform in group_by_source(fmt, tensors.keys()):
            t = TRANSFORMS[transform]
            if t.stacked:
                plan += _unstack_plan(key, t, tensors, names[0])
                continue
            shape = tuple(t.join(tuple(_meta_like(tensors, n) for n in names)).shape)

            def produce(names=names, t=t):
                return t.join(tuple(tensors.get(n) for n in names))

            plan.append(PlannedTensor(key, shape, tensors.dtype(names[0]), produce))
        files, _ = write_weights(tmp, plan)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for name in um.meta.get("tokenizer", []):
            shutil.copyfile(um.path / name, tmp / name)
    return {"path": str(out), "format": "hf", "family": um.family, "architecture": arch.architecture,
            "weights": files, "n_tensors": len(plan)}


def _unstack_plan(template: str, t, tensors, name: str) -> list[PlannedTensor]:
    """One HF tensor per piece of the stacked canonical ``name`` (an MoE layer's experts).
    The stack is read once, when its first piece is written, and dropped after its last:
    peak memory is one stack."""
    pieces = unstack(template, t, _meta_like(tensors, name))
    held: dict[str, dict] = {}

    def produce(key: str):
        if not held:
            held["pieces"] = unstack(template, t, tensors.get(name))
        piece = held["pieces"].pop(key).contiguous()
        if not held["pieces"]:
            held.clear()
        return piece

    return [PlannedTensor(key, tuple(p.shape), p.dtype, functools.partial(produce, key)) for key, p in pieces.items()]


def _meta_like(tensors, name):
    import torch

    return torch.empty(tensors.shape(name), dtype=tensors.dtype(name), device="meta")


def export(model_path: str | Path, fmt: str, out: str | Path | None, force: bool = False, *, dtype: str | None = None,
           provider: str | None = None, moe_op: str | None = None, progress=None) -> dict:
    """``convert export``: ``hf`` (exact round trip, default out PATH/hf) or ``onnx``
    (:func:`statecast.convert.onnx_export.export_onnx`; ``dtype`` fp32|fp16|int8, ``provider``
    of its parity check, ``moe_op`` how a mixture of experts is written; default out PATH/onnx,
    PATH/onnx-fp16, PATH/onnx-int8)."""
    if fmt not in EXPORT_FORMATS:
        raise StatecastError(f"unknown export format {fmt!r}; supported: {', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx":
        from .onnx_export import export_onnx

        return export_onnx(model_path, dtype=dtype or "fp32", out=out, force=force, provider=provider or "cpu",
                           progress=progress, moe_op=moe_op or "standard")
    given = [f"--{name.replace('_', '-')}" for name, value in (("dtype", dtype), ("provider", provider), ("moe_op", moe_op))
             if value is not None]
    if given:
        raise StatecastError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --format onnx only")
    if out is None:
        out = Path(model_path) / fmt
    return export_hf(model_path, out, force=force)
