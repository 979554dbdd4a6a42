"""Writing a unified model in other formats: ``hf`` (exact round trip to Hugging Face
format, :mod:`.hf`) and ``onnx`` (a recurrent-mode graph checked in onnxruntime, :mod:`.onnx`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import StatecastError
from .hf import export_hf

EXPORT_FORMATS = ("hf", "onnx")


def export(model_path: str | Path, fmt: str, out: str | Path | None, force: bool = False, *, dtype: str | None = None,
           provider: str | None = None, moe_op: str | None = None, allow_parity_failure: bool | None = None,
           progress=None) -> dict:
    """``convert export``: ``hf`` (exact round trip, default out PATH/hf) or ``onnx``
    (:func:`statecast.export.onnx.export_onnx`; ``dtype`` fp32|fp16|int8, ``provider``
    of its parity check, ``moe_op`` how a mixture of experts is written, ``allow_parity_failure``
    writes a graph that failed its check; default out PATH/onnx, PATH/onnx-fp16, PATH/onnx-int8).
    The ONNX-only options are None (not given) for ``hf``."""
    if fmt not in EXPORT_FORMATS:
        raise StatecastError(f"unknown export format {fmt!r}; supported: {', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx":
        from .onnx import export_onnx

        return export_onnx(model_path, dtype=dtype or "fp32", out=out, force=force, provider=provider or "cpu",
                           progress=progress, moe_op=moe_op or "standard", allow_parity_failure=bool(allow_parity_failure))
    onnx_only = (("dtype", dtype), ("provider", provider), ("moe_op", moe_op), ("allow_parity_failure", allow_parity_failure))
    given = [f"--{name.replace('_', '-')}" for name, value in onnx_only if value is not None]
    if given:
        raise StatecastError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --format onnx only")
    if out is None:
        out = Path(model_path) / fmt
    return export_hf(model_path, out, force=force)
