"""``convert pull``: a Hub repo or local checkpoint -> the unified layout.

Steps: resolve the source (Hub snapshot or local path), recognise its format,
check every tensor name and shape against the family's canonical table before
writing anything, then stream tensors one by one into a temporary directory
that is renamed into place. Source files are hashed in a background thread
while the tensors are written (hashlib releases the GIL).
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..checkpoints import hub, store
from ..checkpoints.layout import FORMAT, META_FILE, PlannedTensor, atomic_directory, sha256_file, write_json_atomic, write_weights
from ..checkpoints.readers import dtype_name, open_tensors, parse_dtype
from ..errors import StatecastError
from ..families import Detected, detect, unified_config
from ..families.tables import TRANSFORMS, Mapping, map_keys


@dataclass
class Source:
    """Where a checkpoint came from, before conversion."""

    id: str  # repo id or absolute local path
    kind: str  # "hub" or "local"
    path: Path  # local directory or file holding the original files
    revision: str | None = None
    sha: str | None = None


def resolve_source(source: str, revision: str | None = None) -> Source:
    p = Path(source).expanduser()
    if p.exists():
        if revision:
            raise StatecastError("--revision applies to Hub repos only; the source is a local path")
        return Source(id=str(p.absolute()), kind="local", path=p.absolute())
    if hub.looks_like_repo_id(source):
        snap = hub.download(source, revision)
        return Source(id=source, kind="hub", path=snap.path, revision=snap.revision, sha=snap.sha)
    raise StatecastError(f"{source!r} is neither an existing path nor a Hub repo id (org/name)")


def default_output(src: Source) -> Path:
    if src.kind == "hub":
        return store.path_for(src.id, src.revision)
    name = src.path.stem if src.path.is_file() else src.path.name
    return store.path_for(name)


def plan_tensors(det: Detected, src_tensors, ucfg: dict, dtype: torch.dtype | None) -> tuple[Mapping, list[PlannedTensor]]:
    """Check names and shapes against the family table; return the mapping and the write
    plan in the same order (no data read yet)."""
    shapes = {k: src_tensors.shape(k) for k in src_tensors.keys()}
    mapping = map_keys(det.fmt, shapes, det.family.expected_shapes(ucfg), str(det.root))
    plan = []
    for name, (target, shape) in mapping.entries.items():
        out_dtype = det.family.storage_dtype(name, src_tensors.dtype(_first_source(target)), dtype)

        def produce(target=target, out_dtype=out_dtype):
            transform = TRANSFORMS[target.transform]
            if transform.stacked:  # peak memory: the pieces and their stack, one layer's experts
                return transform.forward([src_tensors.get(k).to(out_dtype) for k in target.stack])
            return transform.pieces(src_tensors.get(target.source))[target.part].to(out_dtype)

        plan.append(PlannedTensor(name, tuple(shape), out_dtype, produce))
    return mapping, plan


def _first_source(target) -> str:
    """The source key (of a stacked tensor: its first piece's) that gives the source dtype."""
    return target.stack[0] if target.stack else target.source


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled, leave=False)


def convert_local(det: Detected, src: Source, out: Path, dtype: torch.dtype | None = None, force: bool = False,
                  progress: bool = True, shard_bytes: int | None = None) -> dict:
    with open_tensors(det.files) as tensors:
        shapes = {k: tensors.shape(k) for k in tensors.keys()}
        ucfg = unified_config(det, shapes)
        mapping, plan = plan_tensors(det, tensors, ucfg, dtype)
        with cf.ThreadPoolExecutor(max_workers=1) as pool, atomic_directory(out, force=force) as tmp:
            hashes = {f: pool.submit(source_sha256, f) for f in det.files + list(det.tokenizer.values())}
            bar = _progress(sum(p.nbytes for p in plan), f"convert {out.name}", progress)
            kwargs = {"max_shard_bytes": shard_bytes} if shard_bytes else {}
            files, digests = write_weights(tmp, plan, on_tensor=lambda p: bar.update(p.nbytes), **kwargs)
            bar.close()
            for name, f in det.tokenizer.items():
                shutil.copyfile(f, tmp / name)
            dtypes = sorted({dtype_name(p.dtype) for p in plan})
            meta = {
                "format": FORMAT,
                "family": det.family.name,
                "config": ucfg,
                "dtype": dtype_name(dtype) if dtype is not None else _main_dtype(plan),
                "n_params": sum(math.prod(p.shape) for p in plan),
                "source": {
                    "id": src.id,
                    "kind": src.kind,
                    "format": det.fmt.name,
                    "path": str(det.reference_path),
                    "revision": src.revision,
                    "sha": src.sha,
                    "files": {_rel(f, det.root): h.result() for f, h in hashes.items()},
                    "hf_config": det.hf_config,
                    "dtype": _main_dtype([PlannedTensor(p.name, p.shape, tensors.dtype(_first_source(target)), None)
                                          for p, (target, _) in zip(plan, mapping.entries.values())]),
                },
                "weights": files,
                "tokenizer": sorted(det.tokenizer),
                "tensor_dtypes": dtypes,
                "tensors": {p.name: {"shape": list(p.shape), "dtype": dtype_name(p.dtype), "sha256": digests[p.name]} for p in plan},
                "created_by": f"statecast {__version__}",
            }
            write_json_atomic(tmp / META_FILE, meta)
    return summary(out, meta)


def source_sha256(f: Path) -> str:
    """sha256 of a source file. Files in the Hugging Face cache that came through Git LFS
    are stored as ``blobs/<sha256>`` (verified by huggingface_hub on download): reuse that."""
    target = f.resolve()
    if target.parent.name == "blobs" and len(target.name) == 64 and all(c in "0123456789abcdef" for c in target.name):
        return target.name
    return sha256_file(f)


def summary(path: Path, meta: dict) -> dict:
    src = meta["source"]
    return {
        "path": str(path),
        "family": meta["family"],
        "source": src["id"],
        "source_format": src["format"],
        "revision": src.get("revision"),
        "sha": src.get("sha"),
        "n_params": meta["n_params"],
        "dtype": meta["dtype"],
        "n_tensors": len(meta["tensors"]),
        "weights": meta["weights"],
    }


def _main_dtype(plan: list[PlannedTensor]) -> str:
    """The dtype holding most parameters (a few tensors may be kept in float32)."""
    count: dict[torch.dtype, int] = {}
    for p in plan:
        count[p.dtype] = count.get(p.dtype, 0) + math.prod(p.shape)
    return dtype_name(max(count, key=count.get))


def _rel(f: Path, root: Path) -> str:
    try:
        return str(f.relative_to(root))
    except ValueError:
        return f.name


def pull(source: str, revision: str | None = None, out: str | Path | None = None, dtype: str | None = None,
         force: bool = False, progress: bool = True) -> dict:
    """Convert ``source`` (Hub repo id, Hub-format directory, or native file) into the unified layout.

    Returns a summary dict (``path``, ``family``, ``source``, ``n_params``, ``dtype``, ...).
    """
    torch_dtype = parse_dtype(dtype) if dtype else None
    if out is not None and Path(out).exists() and not force:  # fail before any download
        raise StatecastError(f"output path {Path(out).absolute()} already exists (pass --force to replace it)")
    src = resolve_source(source, revision)
    det = detect(src.path)
    target = Path(out) if out is not None else default_output(src)
    if out is None and not force:
        existing = _same_conversion(target, src, dtype)
        if existing is not None:
            return existing
    return convert_local(det, src, target.absolute(), torch_dtype, force=force, progress=progress)


def _same_conversion(target: Path, src: Source, dtype: str | None) -> dict | None:
    """The store already holds this exact source (same id and commit, same dtype): reuse it."""
    from ..checkpoints.layout import is_unified, open_unified

    if not is_unified(target):
        return None
    meta = open_unified(target).meta
    same = meta["source"].get("id") == src.id and meta["source"].get("sha") == src.sha and src.sha is not None
    if same and (dtype is None or meta["dtype"] == dtype):
        return summary(target, meta)
    return None
