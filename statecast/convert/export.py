"""``convert export --format hf``: the unified layout back to Hugging Face format.

The family's HF table read backwards: canonical name -> HF key, with each
transform's inverse. Tensor bytes are unchanged, so HF -> unified -> HF
round-trips exactly. (ONNX export is a separate module.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..checkpoints.layout import PlannedTensor, atomic_directory, open_unified, write_weights
from ..errors import StatecastError
from .families import FAMILIES
from .tables import TRANSFORMS

EXPORT_FORMATS = ("hf",)


def export_hf(model_path: str | Path, out: str | Path, force: bool = False) -> dict:
    um = open_unified(model_path)
    fam = FAMILIES[um.family]
    out = Path(out).absolute()
    with um.tensors() as tensors, atomic_directory(out, force=force) as tmp:
        plan = []
        for name in tensors.keys():
            key, transform = fam.hf.from_canonical(name)
            t = TRANSFORMS[transform]
            shape = tuple(t.inverse(_meta_like(tensors, name)).shape)

            def produce(name=name, t=t):
                return t.inverse(tensors.get(name))

            plan.append(PlannedTensor(key, shape, tensors.dtype(name), produce))
        files, _ = write_weights(tmp, plan)
        base = um.source.get("hf_config")
        cfg = fam.hf_config(um.config, base)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for name in um.meta.get("tokenizer", []):
            shutil.copyfile(um.path / name, tmp / name)
    return {"path": str(out), "format": "hf", "family": um.family, "weights": files, "n_tensors": len(plan)}


def _meta_like(tensors, name):
    import torch

    return torch.empty(tensors.shape(name), dtype=tensors.dtype(name), device="meta")


def export(model_path: str | Path, fmt: str, out: str | Path | None, force: bool = False) -> dict:
    if fmt not in EXPORT_FORMATS:
        raise StatecastError(f"unknown export format {fmt!r}; supported: {', '.join(EXPORT_FORMATS)}")
    if out is None:
        out = Path(model_path) / fmt
    return export_hf(model_path, out, force=force)
