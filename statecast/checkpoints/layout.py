"""The unified layout (format ``statecast/1``): write it atomically, read it back.

A unified model is a directory::

    statecast.json            format, family, unified config, provenance, tensor manifest
    model.safetensors         canonical tensor names (sharded + index past a size threshold)
    tokenizer files           copied from the source
    parity.json, parity.md    after ``convert verify``

Tensors are written one at a time by a streaming safetensors writer (the header
is computed from the plan first), so peak memory is about one tensor. Everything
is written into a temporary sibling directory that is renamed into place only
when complete: a failed or interrupted conversion leaves nothing that looks like
a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .. import __version__
from ..errors import StatecastError
from .readers import ST_CODES, dtype_name, open_tensors, read_safetensors_header
from .store import META_FILE

FORMAT = "statecast/1"
SHARD_BYTES = 4 * 1024**3  # shard past 4 GiB, like transformers' default max_shard_size ballpark
ALIGN = 8


@dataclass
class PlannedTensor:
    """One output tensor: its final name, shape and dtype, and how to produce it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# --------------------------------------------------------------------------- safetensors writer


def _header_bytes(plan: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for p in plan:
        header[p.name] = {"dtype": ST_CODES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % ALIGN)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path: Path, plan: list[PlannedTensor], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[PlannedTensor], None] | None = None) -> dict[str, str]:
    """Stream ``plan`` into ``path``; returns ``{name: sha256}`` of each tensor's bytes."""
    digests: dict[str, str] = {}
    with open(path, "wb") as f:
        f.write(_header_bytes(plan, metadata or {"format": "pt"}))
        for p in plan:
            t = p.produce()
            if tuple(t.shape) != p.shape or t.dtype != p.dtype:
                raise StatecastError(
                    f"tensor {p.name}: produced {tuple(t.shape)} {dtype_name(t.dtype)}, planned {p.shape} {dtype_name(p.dtype)}"
                )
            buf = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(buf)
            digests[p.name] = hashlib.sha256(buf).hexdigest()
            del t, buf
            if on_tensor is not None:
                on_tensor(p)
    return digests


def shard_plan(plan: list[PlannedTensor], max_bytes: int = SHARD_BYTES) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for p in plan:
        if shards[-1] and size + p.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def write_weights(directory: Path, plan: list[PlannedTensor], prefix: str = "model",
                  max_shard_bytes: int = SHARD_BYTES,
                  on_tensor: Callable[[PlannedTensor], None] | None = None) -> tuple[list[str], dict[str, str]]:
    """Write ``plan`` as ``{prefix}.safetensors`` or shards plus an index; returns (files, digests)."""
    shards = shard_plan(plan, max_shard_bytes)
    if len(shards) == 1:
        names = [f"{prefix}.safetensors"]
    else:
        names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    digests: dict[str, str] = {}
    for name, shard in zip(names, shards):
        digests.update(write_safetensors(directory / name, shard, on_tensor=on_tensor))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(p.nbytes for p in plan)},
            "weight_map": {p.name: name for name, shard in zip(names, shards) for p in shard},
        }
        (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names, digests


# --------------------------------------------------------------------------- atomic directories


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; rename it to ``out`` only on success."""
    out = Path(out).absolute()
    if out.exists() and not force:
        raise StatecastError(f"output path {out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():  # --force: move the old one aside, swap, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- reading a unified model


@dataclass
class UnifiedModel:
    """A unified-layout directory and its parsed ``statecast.json``."""

    path: Path
    meta: dict

    @property
    def family(self) -> str:
        return self.meta["family"]

    @property
    def config(self) -> dict:
        return self.meta["config"]

    @property
    def source(self) -> dict:
        return self.meta.get("source", {})

    def weight_paths(self) -> list[Path]:
        return [self.path / f for f in self.meta["weights"]]

    def tensors(self):
        return open_tensors(self.weight_paths())

    def state_dict(self) -> dict[str, torch.Tensor]:
        with self.tensors() as src:
            return {k: src.get(k) for k in src.keys()}

    def write_meta(self, meta: dict | None = None) -> None:
        if meta is not None:
            self.meta = meta
        write_json_atomic(self.path / META_FILE, self.meta)


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def is_unified(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def open_unified(path: Path | str) -> UnifiedModel:
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        if not path.exists():
            raise StatecastError(f"no such model: {path}")
        raise StatecastError(f"{path} is not a statecast model (no {META_FILE}); convert it first with `convert pull`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise StatecastError(f"corrupt {meta_path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise StatecastError(f"{meta_path}: unsupported format {meta.get('format')!r} (this is statecast {__version__}, reads {FORMAT})")
    for f in meta.get("weights", []):
        if not (path / f).is_file():
            raise StatecastError(f"{path}: weight file {f} is missing")
        read_safetensors_header(path / f)
    return UnifiedModel(path=path, meta=meta)
