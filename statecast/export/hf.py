"""``convert export --format hf``: the unified layout back to Hugging Face format.

The HF table of the source's architecture read backwards: canonical name -> HF key, with each
transform's inverse. Tensor bytes are unchanged, so HF -> unified -> HF
round-trips exactly.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

from .. import __version__
from ..checkpoints.atomic import EXPORT_MARKER, atomic_directory
from ..checkpoints.layout import PlannedTensor, open_unified, verify_tensor_hashes, write_weights
from ..convert.describe import check_model
from ..families import format_by_name
from ..families.tables import TRANSFORMS, group_by_source, unstack


def export_hf(model_path: str | Path, out: str | Path, force: bool = False) -> dict:
    """Write the unified model at ``model_path`` in Hugging Face format into ``out`` (atomically;
    ``force`` replaces only a statecast output, and ``out`` may not be or contain the model).
    The model is checked first: its manifest against the family (a config that does not
    match the tensors is an error) and every tensor against its sha256 (a model modified
    after conversion is refused, naming the tensor)."""
    um = open_unified(model_path)
    check_model(um)
    verify_tensor_hashes(um)
    fam, arch, fmt = format_by_name(um.source.get("format", ""))
    base = um.source.get("hf_config")
    if arch is None:  # a native source: write the family's Hub architecture, from scratch
        arch = fam.arch(fam.native.export_as)
        fmt, base = arch.formats[0], None
    cfg = arch.hf_config(um.config, base)
    out = Path(out).absolute()
    with um.tensors() as tensors, atomic_directory(out, force=force, keep=[um.path]) as tmp:
        plan = []
        for key, names, transform in group_by_source(fmt.for_config(um.config), tensors.keys()):
            t = TRANSFORMS[transform]
            if t.stacked:
                plan += _unstack_plan(key, t, tensors, names[0])
                continue
            shape = tuple(t.join(tuple(_meta_like(tensors, n) for n in names)).shape)

            def produce(names=names, t=t):
                return t.join(tuple(tensors.get(n) for n in names))

            plan.append(PlannedTensor(key, shape, tensors.dtype(names[0]), produce))
        files, _ = write_weights(tmp, plan, hashes=False)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for name in um.tokenizer_files():  # names checked to stay inside the model (and so inside tmp)
            shutil.copyfile(um.path / name, tmp / name)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": "statecast-hf-export/1", "model": str(um.path),
                                                      "created_by": f"statecast {__version__}"}) + "\n")
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
