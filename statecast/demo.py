"""``convert demo``: the whole chain offline on small seeded models built with transformers.

Every family's record has a demo builder (``Family.demo``) that saves a checkpoint in Hub
format with a tokenizer, exactly what a Hub repo holds; the tests build their fixtures with
the same builders.
"""

from __future__ import annotations

import shutil
from typing import Callable

from .checkpoints import store
from .errors import StatecastError


def run_demo(families: tuple[str, ...] | None = None, say: Callable[[str], None] = print) -> dict:
    """Build, pull, verify, generate, export to ONNX and generate through onnxruntime for each
    family; sources stay in the store so ``convert verify demo-...`` can be rerun."""
    from .checkpoints.layout import open_unified
    from .convert.generate import generate
    from .convert.pull import pull
    from .export.onnx import export_onnx
    from .families import FAMILIES
    from .parity.verify import render_markdown, verify
    from .runtime import generate as generate_onnx

    families = tuple(FAMILIES) if not families else families
    results = {}
    for n, family in enumerate(families, 1):
        if family not in FAMILIES:
            raise StatecastError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
        demo = FAMILIES[family].demo
        name, what, build = demo.name, demo.description, demo.build
        src = store.home() / "demo-source" / name
        shutil.rmtree(src, ignore_errors=True)
        build(src)
        info = pull(str(src), out=store.path_for(name), force=True, progress=False)
        cfg = open_unified(info["path"]).config
        say(f"== {n}/{len(families)} {family}: {what}")
        say(f"1. built a seeded {what.split(' (')[0]} ({cfg['n_layer']} layers x {cfg['d_model']}, vocab "
            f"{cfg['vocab_size']}) with transformers, saved in Hub format: {src}")
        say(f"2. convert pull {src} -> {info['path']} ({info['n_params']:,} parameters, {info['dtype']})")
        report = verify(info["path"], device="cpu", raise_on_fail=False)
        say(f"3. convert verify {name} -> {'PASS' if report['passed'] else 'FAIL'} against "
            f"{report['reference']['implementation']} {report['reference']['version']}")
        gen = generate(info["path"], prompt="The quick brown fox", max_new_tokens=24)
        say(f"4. convert generate {name} --prompt 'The quick brown fox' -> {gen['text']!r}")
        onnx = export_onnx(info["path"], force=True)
        p = onnx["parity"]
        say(f"5. convert export {name} --format onnx -> {onnx['path']} ({onnx['bytes'] / 1024:.0f} kB, T="
            f"{onnx['sequence_length']}); onnxruntime vs PyTorch: max_abs_diff {p['max_abs_diff']:.2g}, "
            f"top-1 {p['top1_agreement']:.3f}")
        ort = generate_onnx(onnx["path"], prompt="The quick brown fox", max_new_tokens=24)
        same = "same ids as PyTorch" if ort["new_ids"] == gen["new_ids"] else "ids DIFFER from PyTorch"
        say(f"6. convert generate {name}/onnx --runtime onnx --prompt 'The quick brown fox' -> {same}")
        say("")
        say(render_markdown(report))
        results[family] = {"path": info["path"], "parity": report, "generate": gen, "onnx": onnx,
                           "onnx_generate": ort}
    return results
