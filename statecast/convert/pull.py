"""``convert pull``: a Hub repo or local checkpoint -> the unified layout.

Steps: resolve the source (Hub snapshot or local path), recognise its format,
check every tensor name, shape and dtype against the family's canonical table before
writing anything, then stream tensors one by one into a temporary directory
that is renamed into place (:func:`statecast.checkpoints.atomic.atomic_directory`).

Each source byte is read and hashed once, in worker threads (hashlib releases the GIL): a
tensor whose bytes are unchanged (most of them; a reshape keeps the bytes) is copied by a
worker from the source file's memory map, block by block, hashing each block as it copies
it, and its manifest sha256 is the sha256 of its byte range in the source file, hashed once
for both the manifest and the source file's digest (a ``sha256-tree`` over the file's header and tensors; a Hub
file's LFS sha256 is reused as it is). Floating weights are checked for NaN/Inf in the same
pass (``allow_nonfinite`` turns it off).
"""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..checkpoints import hub, store
from ..checkpoints.atomic import atomic_directory, check_output, write_json_atomic
from ..checkpoints.layout import FORMAT, META_FILE, FileHasher, PlannedTensor, safetensors_layout, tree_digest, write_weights
from ..checkpoints.readers import dtype_name, open_tensors, parse_dtype
from ..errors import StatecastError
from ..families import Detected, detect, unified_config
from ..families.tables import TRANSFORMS, Mapping, map_keys, same_bits


@dataclass
class Source:
    """Where a checkpoint came from, before conversion."""

    id: str  # repo id or absolute local path
    kind: str  # "hub" or "local"
    path: Path  # local directory or file holding the original files
    revision: str | None = None
    sha: str | None = None


def resolve_source(source: str, revision: str | None = None, progress: bool = True) -> Source:
    p = Path(source).expanduser()
    if p.exists():
        if revision:
            raise StatecastError("--revision applies to Hub repos only; the source is a local path")
        return Source(id=str(p.absolute()), kind="local", path=p.absolute())
    if hub.looks_like_repo_id(source):
        snap = hub.download(source, revision, progress=progress)
        return Source(id=source, kind="hub", path=snap.path, revision=snap.revision, sha=snap.sha)
    raise StatecastError(f"{source!r} is neither an existing path nor a Hub repo id (org/name)")


def default_output(src: Source) -> Path:
    if src.kind == "hub":
        return store.path_for(src.id, src.revision)
    name = src.path.stem if src.path.is_file() else src.path.name
    return store.path_for(name)


def plan_tensors(det: Detected, src_tensors, ucfg: dict, dtype: torch.dtype | None,
                 allow_nonfinite: bool = False) -> tuple[Mapping, list[PlannedTensor]]:
    """Check names, shapes and dtypes against the family table; return the mapping and the
    write plan in the same order (no data read yet). Unless ``allow_nonfinite``, each produced
    floating tensor is checked for NaN/Inf as it is produced."""
    shapes = {k: src_tensors.shape(k) for k in src_tensors.keys()}
    mapping = map_keys(det.fmt.for_config(ucfg), shapes, det.family.expected_shapes(ucfg), str(det.root))
    _check_dtypes(src_tensors, mapping, det)
    _check_copies(src_tensors, mapping, det)
    plan = []
    for name, (target, shape) in mapping.entries.items():
        out_dtype = det.family.storage_dtype(name, src_tensors.dtype(_first_source(target)), dtype)

        def produce(target=target, out_dtype=out_dtype, name=name):
            transform = TRANSFORMS[target.transform]
            if transform.stacked:  # peak memory: the pieces and their stack, one layer's experts
                t = transform.forward([src_tensors.get(k).to(out_dtype) for k in target.stack])
            else:
                t = transform.pieces(src_tensors.get(target.source))[target.part].to(out_dtype)
            if not allow_nonfinite:
                _check_finite(t, src_tensors, target, det)
            return t

        plan.append(PlannedTensor(name, tuple(shape), out_dtype, produce))
    return mapping, plan


def _first_source(target) -> str:
    """The source key (of a stacked tensor: its first piece's) that gives the source dtype."""
    return target.stack[0] if target.stack else target.source


def _source_keys(target) -> list[str]:
    return list(target.stack) if target.stack else [target.source]


def _file_of(src_tensors, key: str, det: Detected) -> Path:
    where = getattr(src_tensors, "_where", {})
    return Path(where.get(key, det.files[0] if len(det.files) == 1 else det.root))


def _check_dtypes(src_tensors, mapping: Mapping, det: Detected) -> None:
    """Every source tensor the model uses is floating point (all families' weights are)."""
    try:
        from ..checkpoints.validate import check_weight_dtypes
    except ImportError:  # pragma: no cover - the validation layer is part of checkpoints/
        check_weight_dtypes = None
    by_file: dict[Path, list[str]] = {}
    for target, _ in mapping.entries.values():
        for key in _source_keys(target):
            by_file.setdefault(_file_of(src_tensors, key, det), []).append(key)
    for f, keys in by_file.items():
        if check_weight_dtypes is not None:
            check_weight_dtypes(src_tensors, f, keys)
            continue
        bad = [k for k in keys if not src_tensors.dtype(k).is_floating_point]
        if bad:
            raise StatecastError(f"{f}: tensor {bad[0]!r} is {dtype_name(src_tensors.dtype(bad[0]))}; expected a floating-point weight")


def _check_copies(src_tensors, mapping: Mapping, det: Detected) -> None:
    """A tensor the source stores under several names (``Target.copies``: a tied block saved
    more than once) is the same bits under each; read one pair at a time, before anything is
    written."""
    seen = set()
    for target, _ in mapping.entries.values():
        first = None
        for key in target.copies:
            if (target.source, key) in seen:  # the parts of a split tensor share their source
                continue
            seen.add((target.source, key))
            first = src_tensors.get(target.source) if first is None else first
            if not same_bits(first, src_tensors.get(key)):
                raise StatecastError(f"{_file_of(src_tensors, key, det)}: tensors {target.source!r} and {key!r} are "
                                     f"copies of one tied tensor but differ")


def _nonfinite_message(f: Path, key: str) -> str:
    return (f"{f}: tensor {key!r} holds NaN or Inf values; expected finite weights "
            f"(--allow-nonfinite converts it anyway)")


def _all_finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point() or t.numel() == 0:
        return True
    s = float(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))
    return math.isfinite(s) or bool(torch.isfinite(t).all())  # a finite sum: every value is finite


def _check_finite(t: torch.Tensor, src_tensors, target, det: Detected) -> None:
    if _all_finite(t):
        return
    for key in _source_keys(target):
        if not _all_finite(src_tensors.get(key)):
            raise StatecastError(_nonfinite_message(_file_of(src_tensors, key, det), key))
    key = _first_source(target)
    raise StatecastError(f"{_file_of(src_tensors, key, det)}: tensor {key!r} overflows {dtype_name(t.dtype)} (values "
                         f"beyond its range become Inf); convert without --dtype, or pass --allow-nonfinite")


# numpy views of a block of raw safetensors bytes, for the finiteness check while hashing
_NP_FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
_EXPONENT_BITS = {"BF16": 0x7F80}  # no numpy bfloat16: all exponent bits set means Inf or NaN


def _block_check(code: str, f: Path, key: str):
    """A check of one block of a tensor's bytes (in the hashing threads), or None. A finite sum
    means every value is finite (one pass, no allocation); only a block whose sum is not
    finite (a NaN or Inf, or an overflow of the sum) is looked at element by element."""
    if code in _NP_FLOATS:
        np_dtype = _NP_FLOATS[code]
        acc = np.float32 if np_dtype == np.float16 else np_dtype

        def check(block) -> None:
            x = np.frombuffer(block, np_dtype)
            with np.errstate(all="ignore"):
                ok = bool(np.isfinite(np.add.reduce(x, dtype=acc))) or bool(np.isfinite(x).all())
            del x
            if not ok:
                raise StatecastError(_nonfinite_message(f, key))

        return check
    if code in _EXPONENT_BITS:
        mask = _EXPONENT_BITS[code]

        def check(block) -> None:
            u = np.frombuffer(block, np.uint16)
            bad = bool(np.any(np.bitwise_and(u, mask) == mask))
            del u
            if bad:
                raise StatecastError(_nonfinite_message(f, key))

        return check
    return None


def _same_bytes(transform_name: str, part: int, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether the transform hands back the source tensor's bytes unchanged (a reshape), tried
    on a meta tensor: a contiguous view of all of it from its first element."""
    t = TRANSFORMS[transform_name]
    if t.stacked:
        return False
    m = torch.empty(shape, dtype=dtype, device="meta")
    try:
        piece = t.pieces(m)[part]
    except Exception:
        return False
    same_storage = piece is m or piece._base is m
    return (same_storage and piece.is_contiguous() and piece.storage_offset() == 0 and piece.numel() == m.numel()
            and piece.dtype == dtype)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled, leave=False)


def source_paths(src: Source, det: Detected) -> list[Path]:
    """What the output may not be, contain or sit inside: the source (directory or file), its
    weight and tokenizer files and, in the Hugging Face cache, the blobs they link to."""
    paths = [src.path, *det.files, *det.tokenizer.values()]
    return list(dict.fromkeys([*paths, *(p.resolve() for p in paths)]))


def _blob_sha256(f: Path) -> str | None:
    """Files in the Hugging Face cache that came through Git LFS are stored as
    ``blobs/<sha256>`` (checked against the Hub's sha256 after download by checkpoints.hub.verify_snapshot): that is their sha256."""
    target = f.resolve()
    if target.parent.name == "blobs" and len(target.name) == 64 and all(c in "0123456789abcdef" for c in target.name):
        return target.name
    return None


def source_sha256(f: Path) -> str:
    """Plain sha256 of a source file (the LFS blob name where there is one)."""
    from ..checkpoints.layout import sha256_file

    return _blob_sha256(f) or sha256_file(f)


def _plan_sources(det: Detected, src_tensors, mapping: Mapping, plan: list[PlannedTensor], hasher: FileHasher,
                  allow_nonfinite: bool):
    """Turn every planned tensor whose bytes are unchanged into a copy from its source file
    (hashed and checked for NaN/Inf by the worker that copies it), and schedule the hashing of
    the rest of each source file (header, dropped tensors, tensors that are transformed), so
    that each source byte is hashed once. Returns ``finish(digests)``: {source file: digest},
    given the written tensors' digests."""
    unchanged: dict[str, list[PlannedTensor]] = {}  # source key -> planned tensors that are its bytes
    for p, (target, _) in zip(plan, mapping.entries.values()):
        if not target.stack and p.dtype == src_tensors.dtype(target.source) and _same_bytes(
                target.transform, target.part, tuple(src_tensors.shape(target.source)), p.dtype):
            unchanged.setdefault(target.source, []).append(p)
    finishers: dict[Path, object] = {}
    for f in det.files:
        lfs = _blob_sha256(f)
        if f.suffix != ".safetensors":
            finishers[f] = (lambda _, v=lfs: v) if lfs else (lambda _, r=hasher.plain(f): r.result())
            continue
        layout = safetensors_layout(f)
        copied: dict[str, str] = {}  # source key -> the planned tensor whose copy hashes it
        for key, (code, _, begin, _) in layout.tensors.items():
            for i, p in enumerate(unchanged.get(key, [])):
                check = None if allow_nonfinite or i else _block_check(code, f, key)
                p.copy_from = (f, begin, check)
                copied.setdefault(key, p.name)
        if lfs:  # its sha256 is known (the Hub's LFS oid): nothing else to hash
            finishers[f] = lambda _, v=lfs: v
            continue
        others = {(b, e): hasher.range(f, b, e) for b, e, name in layout.segments() if name not in copied}
        segments = layout.segments()

        def finish(digests, segments=segments, others=others, copied=copied):
            return tree_digest((e - b, digests[copied[name]] if name in copied else others[(b, e)].result())
                               for b, e, name in segments)

        finishers[f] = finish
    for f in det.tokenizer.values():
        lfs = _blob_sha256(f)
        finishers[f] = (lambda _, v=lfs: v) if lfs else (lambda _, r=hasher.plain(f): r.result())
    return lambda digests: {f: fin(digests) for f, fin in finishers.items()}


@contextlib.contextmanager
def _collector_paused():
    """No cyclic garbage collection meanwhile: a conversion makes few objects, and a full
    collection of a process that has imported torch (~0.1 s of one core) is better run after
    the bytes are written than during it. Restored on exit."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def convert_local(det: Detected, src: Source, out: Path, dtype: torch.dtype | None = None, force: bool = False,
                  progress: bool = True, shard_bytes: int | None = None, allow_nonfinite: bool = False) -> dict:
    with _collector_paused():
        return _convert_local(det, src, out, dtype, force, progress, shard_bytes, allow_nonfinite)


def _convert_local(det: Detected, src: Source, out: Path, dtype: torch.dtype | None, force: bool, progress: bool,
                   shard_bytes: int | None, allow_nonfinite: bool) -> dict:
    sources = source_paths(src, det)
    check_output(out, force, sources=sources)  # before any work (again when renaming into place)
    with open_tensors(det.files) as tensors:
        shapes = {k: tensors.shape(k) for k in tensors.keys()}
        ucfg = unified_config(det, shapes)
        mapping, plan = plan_tensors(det, tensors, ucfg, dtype, allow_nonfinite=allow_nonfinite)
        with FileHasher() as hasher, atomic_directory(out, force=force, sources=sources) as tmp:
            finish = _plan_sources(det, tensors, mapping, plan, hasher, allow_nonfinite)
            bar = _progress(sum(p.nbytes for p in plan), f"convert {out.name}", progress)
            kwargs = {"max_shard_bytes": shard_bytes} if shard_bytes else {}
            files, digests = write_weights(tmp, plan, on_tensor=lambda p: bar.update(p.nbytes), pool=hasher.pool, **kwargs)
            bar.close()
            file_digests = finish(digests)
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
                    "files": {_rel(f, det.root): d for f, d in file_digests.items()},
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
         force: bool = False, progress: bool = True, allow_nonfinite: bool = False) -> dict:
    """Convert ``source`` (Hub repo id, Hub-format directory, or native file) into the unified layout.

    ``force`` replaces an existing output only if it is a statecast output; the output may
    never be, contain or sit inside the source. ``allow_nonfinite`` converts floating weights
    that hold NaN or Inf (refused by default). Returns a summary dict (``path``, ``family``,
    ``source``, ``n_params``, ``dtype``, ...).
    """
    with _collector_paused():
        return _pull(source, revision, out, dtype, force, progress, allow_nonfinite)


def _pull(source: str, revision: str | None, out: str | Path | None, dtype: str | None, force: bool, progress: bool,
          allow_nonfinite: bool) -> dict:
    torch_dtype = parse_dtype(dtype) if dtype else None
    if out is not None:  # fail before any download
        local = Path(source).expanduser()
        check_output(Path(out), force, sources=[local] if local.exists() else [])
    src = resolve_source(source, revision, progress=progress)
    det = detect(src.path)
    target = Path(out) if out is not None else default_output(src)
    if out is None and not force:
        existing = _same_conversion(target, src, dtype)
        if existing is not None:
            return existing
    return convert_local(det, src, target.absolute(), torch_dtype, force=force, progress=progress,
                         allow_nonfinite=allow_nonfinite)


def _same_conversion(target: Path, src: Source, dtype: str | None) -> dict | None:
    """The store already holds this exact source (same id and commit, same dtype): reuse it."""
    from ..checkpoints.layout import is_unified, open_unified

    if not is_unified(target):
        return None
    try:
        meta = open_unified(target).meta
    except StatecastError:  # a damaged store entry is not reused (replacing it needs --force)
        return None
    same = meta["source"].get("id") == src.id and meta["source"].get("sha") == src.sha and src.sha is not None
    if same and (dtype is None or meta["dtype"] == dtype):
        return summary(target, meta)
    return None
