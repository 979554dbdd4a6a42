"""The unified layout (format ``statecast/1``): write it atomically, read it back, check it.

A unified model is a directory::

    statecast.json            format, family, unified config, provenance, tensor manifest
    model.safetensors         canonical tensor names (sharded + index past a size threshold)
    tokenizer files           copied from the source
    parity.json, parity.md    after ``convert verify``

Writing. A streaming safetensors writer computes the header from the plan first and writes
each tensor at its offset, so peak memory is about one tensor per thread. A tensor whose
bytes are unchanged from a source file is copied block by block from the source's memory
map by a worker thread, which hashes each block and checks it for NaN/Inf as it copies it
(one read of the bytes; the workers take the largest tensors first); the others are
produced and written by the calling thread and hashed by a worker meanwhile (hashlib
releases the GIL). The writes take turns under a lock, into a file reserved at its full size
first (``fallocate``: the file system allocates its blocks in one call, not page by page as
they are written). The directory is written atomically
(:mod:`statecast.checkpoints.atomic`: a temporary sibling renamed into place, nothing left
behind on failure).

Reading. :func:`open_unified` runs the cheap integrity checks on every open: ``statecast.json``
is a UTF-8 JSON object with the required keys of the right types, every path it names stays
inside the model directory, and the weight files' headers list exactly the manifest's
tensors with its shapes and dtypes, in files of exactly the size the headers describe.
:func:`verify_tensor_hashes` compares every tensor with its manifest sha256 (``verify``,
``inspect --check``, ``export``): one read of each file, its tensors hashed in parallel.

Source digests (provenance). A source file's digest is its plain sha256 (``hex``), except
for a local safetensors file, whose digest is ``sha256-tree:hex``: the sha256 of
``b"statecast sha256-tree/1\n"`` followed by, for each segment of the file in order (the
header, then each tensor's bytes, any gap its own segment), its length (8 bytes, little
endian) and its sha256 (32 bytes). Every byte of the file is committed to, and the
tensors' sha256s, which a conversion needs for the manifest anyway, are computed once and
in parallel, where a plain sha256 of the file would be a second, serial pass.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import errno
import hashlib
import json
import math
import mmap
import os
import re
import struct
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import __version__
from ..errors import StatecastError
from .atomic import write_json_atomic
from .readers import ST_CODES, ST_DTYPES, dtype_name, open_tensors, read_safetensors_header
from .store import META_FILE
from .validate import contained

FORMAT = "statecast/1"
SHARD_BYTES = 4 * 1024**3  # shard past 4 GiB, like transformers' default max_shard_size ballpark
ALIGN = 8
TREE_PREFIX = "sha256-tree:"
BLOCK = 8 << 20  # hashing reads (maps) files in blocks of this size
RELEASE = 32 << 20  # hashed pages are unmapped every this many bytes (resident memory stays small)
PENDING_BYTES = 256 << 20  # produced tensors held for hashing in the background, at most (beyond one)


@dataclass
class PlannedTensor:
    """One output tensor: its final name, shape and dtype, and how to produce it.

    ``copy_from`` (file, byte offset[, check]): the tensor's bytes, exactly, in that file; the
    writer copies them (hashing them, and passing each block to ``check``) and never calls
    ``produce``. ``digest``: returns a produced tensor's sha256 when it is computed elsewhere;
    else the writer hashes the bytes it writes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor] | None
    copy_from: tuple | None = None  # (file, offset) or (file, offset, check)
    digest: Callable[[], str] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def workers() -> int:
    """Hashing threads: one per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- hashing


def hash_range(fd: int, begin: int, end: int, inspect: Callable[[memoryview], None] | None = None,
               name: object = None, copy_to: tuple[int, int, threading.Lock] | None = None) -> str:
    """sha256 of bytes ``[begin, end)`` of the open file ``fd``, read through a memory map in
    :data:`BLOCK`-sized blocks (the pages are released every :data:`RELEASE` bytes, so
    resident memory stays small). ``inspect(block)`` sees each block too, while it is in the
    cache (a finiteness check), and with ``copy_to`` (fd, offset, lock) each block is written
    there (``pwrite`` under ``lock``: one bytes read serves the hash, the check and the copy).
    A file shorter than ``end`` is an error."""
    h = hashlib.sha256()
    if end <= begin:
        return h.hexdigest()
    base = begin - begin % mmap.ALLOCATIONGRANULARITY
    if os.fstat(fd).st_size < end:
        raise StatecastError(f"{name or f'file descriptor {fd}'}: shorter than {end} bytes (the file changed while it was read)")
    mm = mmap.mmap(fd, end - base, offset=base, access=mmap.ACCESS_READ)
    try:
        with contextlib.suppress(AttributeError, OSError):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mm)
        try:
            pos = begin - base
            released = pos - pos % mmap.PAGESIZE
            while pos < end - base:
                stop = min(end - base, pos + BLOCK)  # blocks start at element boundaries of the range
                block = view[pos:stop]
                try:
                    h.update(block)
                    if inspect is not None:
                        inspect(block)  # may raise (it keeps no reference to the block)
                    if copy_to is not None:
                        with copy_to[2]:
                            _pwrite_all(copy_to[0], block, copy_to[1] + pos - (begin - base))
                finally:
                    block.release()
                if hasattr(mmap, "MADV_DONTNEED") and (stop - released >= RELEASE or stop == end - base):
                    lo, hi = released, stop - stop % mmap.PAGESIZE
                    if hi > lo:
                        with contextlib.suppress(OSError):
                            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                        released = hi
                pos = stop
        finally:
            view.release()
    finally:
        mm.close()
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """Plain sha256 of a whole file."""
    with open(path, "rb", buffering=0) as f:
        return hash_range(f.fileno(), 0, os.fstat(f.fileno()).st_size, None, path)


def tree_digest(segments: Iterable[tuple[int, str]]) -> str:
    """:data:`TREE_PREFIX` + sha256 of the (length, sha256) of each segment, in file order."""
    h = hashlib.sha256(b"statecast sha256-tree/1\n")
    for length, hexdigest in segments:
        h.update(length.to_bytes(8, "little") + bytes.fromhex(hexdigest))
    return TREE_PREFIX + h.hexdigest()


@dataclass
class SafetensorsLayout:
    """Where each tensor's bytes are in a safetensors file (absolute offsets)."""

    path: Path
    size: int
    data_start: int
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]]  # name -> (dtype code, shape, begin, end)

    def segments(self) -> list[tuple[int, int, str | None]]:
        """(begin, end, tensor name or None) covering the whole file in order: the header,
        each tensor, and any bytes between or after them."""
        out: list[tuple[int, int, str | None]] = [(0, self.data_start, None)]
        pos = self.data_start
        for name, (_, _, b, e) in sorted(self.tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if b > pos:
                out.append((pos, b, None))
            if b < pos:  # overlapping spans (a validated header has none): hash the file plainly
                raise ValueError("overlap")
            out.append((b, e, name))
            pos = e
        if pos < self.size:
            out.append((pos, self.size, None))
        return out


def safetensors_layout(path: Path) -> SafetensorsLayout:
    header = read_safetensors_header(path)  # validated: typed entries, offsets inside the file
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    start = 8 + n
    tensors = {k: (v["dtype"], tuple(v["shape"]), start + v["data_offsets"][0], start + v["data_offsets"][1])
               for k, v in header.items() if k != "__metadata__"}
    return SafetensorsLayout(Path(path), Path(path).stat().st_size, start, tensors)


class FileHasher:
    """Hash files (plain sha256, or the tensor tree of a safetensors file) and tensors' byte
    ranges on a thread pool, each byte once. A context manager: on exit it waits for the
    pool's work (cancelling what has not started) and closes the files."""

    def __init__(self, n_workers: int | None = None):
        self.pool = cf.ThreadPoolExecutor(n_workers or workers())
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "FileHasher":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def range(self, path: Path, begin: int, end: int, inspect=None) -> cf.Future:
        return self.pool.submit(hash_range, self.fd(path), begin, end, inspect, path)

    def plain(self, path: Path) -> cf.Future:
        fd = self.fd(path)
        return self.pool.submit(lambda: hash_range(fd, 0, os.fstat(fd).st_size, None, path))

    def tree(self, layout: SafetensorsLayout, inspect: dict[str, Callable] | None = None,
             plain: str | None = None) -> tuple[Callable[[], str], dict[str, cf.Future]]:
        """(the file's digest, {tensor: future of its sha256}), every segment hashed once, in
        parallel. ``plain``: the file's sha256, known already (a Hub LFS blob), is the digest
        (the header and gaps are then not hashed)."""
        futures: list[tuple[int, cf.Future]] = []
        per_tensor: dict[str, cf.Future] = {}
        segments = layout.segments()
        for b, e, name in sorted(segments, key=lambda s: s[0] - s[1]):  # largest first: balance the threads
            if plain is not None and name is None:
                continue
            fut = self.range(layout.path, b, e, (inspect or {}).get(name) if name else None)
            if name is not None:
                per_tensor[name] = fut
            futures.append((b, fut))
        lengths = {b: e - b for b, e, _ in segments}

        def digest() -> str:
            if plain is not None:
                for _, f in futures:
                    f.result()  # surface errors
                return plain
            return tree_digest((lengths[b], f.result()) for b, f in sorted(futures, key=lambda x: x[0]))

        return digest, per_tensor

    def digest(self, path: Path, like: str | None = None) -> Callable[[], str]:
        """The digest of ``path`` in the form of ``like`` (a recorded digest, plain or tree; by
        default a tree for ``.safetensors`` files, plain otherwise); a callable that waits for
        it. A file that is not valid safetensors gets a plain digest."""
        tree = like.startswith(TREE_PREFIX) if like is not None else Path(path).suffix == ".safetensors"
        if tree:
            try:
                return self.tree(safetensors_layout(Path(path)))[0]
            except (StatecastError, ValueError):
                pass
        return self.plain(Path(path)).result


def file_digest(path: Path, like: str | None = None) -> str:
    """The digest of one file as a conversion records it (see :meth:`FileHasher.digest`)."""
    with FileHasher() as hasher:
        return hasher.digest(path, like)()


def check_file_digests(root: Path, recorded: dict[str, str], what: str, files: dict[str, Path] | None = None) -> None:
    """Every file ``root / name`` (or ``files[name]``) still has the digest recorded for it;
    the files are hashed in parallel, each byte once. A missing or changed file is an error
    naming it and ``what`` to do about it."""
    with FileHasher() as hasher:
        pending = []
        for name, digest in recorded.items():
            if not isinstance(name, str) or not isinstance(digest, str):
                raise StatecastError(f"{META_FILE}: source.files must map file names to digests, got {name!r}: {digest!r:.80}")
            f = (files or {}).get(name) or contained(root, name, f"recorded source file {name!r}")
            if not f.is_file():
                raise StatecastError(f"the original file {f} is missing since conversion; {what}")
            pending.append((f, digest, hasher.digest(f, like=digest)))
        for f, digest, got in pending:
            if got() != digest:
                raise StatecastError(f"the original file {f} changed since conversion (its digest differs from the "
                                     f"one recorded in {META_FILE}); {what}")


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


def _pwrite_all(fd: int, buf, offset: int) -> None:
    view = memoryview(buf).cast("B")
    try:
        while len(view):
            n = os.pwrite(fd, view, offset)
            offset += n
            view = view[n:]
    finally:
        view.release()


_fallocate_fn: object = None


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for the file ``fd`` before it is written (Linux ``fallocate``,
    mode 0): the file system allocates its blocks in one call instead of block by block as
    the pages are written (measured in bench/README.md, "Conversion"), and a full disk
    fails here, before any byte is copied. Where
    the call does not exist or the file system does not support it, nothing is done (not
    glibc's ``posix_fallocate``, which would emulate it by writing every block)."""
    global _fallocate_fn
    if size <= 0:
        return
    if _fallocate_fn is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = getattr(libc, "fallocate64", None) or libc.fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            _fallocate_fn = fn
        except (AttributeError, OSError, TypeError):
            _fallocate_fn = False
    if not _fallocate_fn:
        return
    if _fallocate_fn(fd, 0, 0, size) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # the writes would fail the same way
        raise OSError(err, os.strerror(err))  # as a failed pwrite would (no file name)
    # EOPNOTSUPP, ENOSYS, EINVAL, EINTR...: written without reserving


def _sha256_bytes(buf) -> str:
    return hashlib.sha256(buf).hexdigest()


def write_safetensors(path: Path, plan: list[PlannedTensor], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[PlannedTensor], None] | None = None, pool: cf.Executor | None = None,
                      hashes: bool = True) -> dict[str, str]:
    """Stream ``plan`` into ``path``; returns ``{name: sha256}`` of each tensor's bytes (empty
    with ``hashes=False``).

    Each tensor goes to its offset (``pwrite``). A tensor with ``copy_from`` is copied by a
    worker of ``pool`` from the source file's memory map, block by block, each block hashed
    and passed to the tensor's check as it is copied (one read of its bytes; the workers take
    the largest tensors first). A produced tensor is written by the calling thread and hashed
    by a worker while the next one is produced (at most :data:`PENDING_BYTES` of them held
    beyond the one being written). The writes into the file take turns under one lock:
    concurrent writes into one file contend in the kernel (measured 3-4x slower on a VM whose
    memory had just been handed back to the host), the hashing does not."""
    own_pool = pool is None
    if own_pool:
        pool = cf.ThreadPoolExecutor(workers())
    digests: dict[str, Callable[[], str]] = {}
    futures: list[cf.Future] = []
    pending: deque[tuple[int, cf.Future]] = deque()
    held = 0
    sources: dict[Path, int] = {}
    lock = threading.Lock()
    try:
        with open(path, "wb", buffering=0) as f:
            out = f.fileno()
            try:
                header = _header_bytes(plan, metadata or {"format": "pt"})
                _preallocate(out, len(header) + sum(p.nbytes for p in plan))
                _pwrite_all(out, header, 0)
                offsets = [len(header)]
                for p in plan[:-1]:
                    offsets.append(offsets[-1] + p.nbytes)
                for p, offset in sorted(((p, o) for p, o in zip(plan, offsets) if p.copy_from is not None),
                                        key=lambda po: -po[0].nbytes):
                    src_path, src_offset, *check = p.copy_from
                    if src_path not in sources:
                        sources[src_path] = os.open(src_path, os.O_RDONLY)
                    fut = pool.submit(hash_range, sources[src_path], src_offset, src_offset + p.nbytes,
                                      check[0] if check else None, src_path, (out, offset, lock))
                    futures.append(fut)
                    if on_tensor is not None:
                        fut.add_done_callback(lambda _, p=p: on_tensor(p))
                    if hashes:
                        digests[p.name] = fut.result
                for p, offset in zip(plan, offsets):
                    if p.copy_from is not None:
                        continue
                    t = p.produce()
                    if tuple(t.shape) != p.shape or t.dtype != p.dtype:
                        raise StatecastError(f"tensor {p.name}: produced {tuple(t.shape)} {dtype_name(t.dtype)}, "
                                             f"planned {p.shape} {dtype_name(p.dtype)}")
                    buf = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                    with lock:
                        _pwrite_all(out, buf, offset)
                    if hashes and p.digest is not None:
                        digests[p.name] = p.digest
                    elif hashes:
                        fut = pool.submit(_sha256_bytes, buf)  # holds ``buf`` until hashed
                        futures.append(fut)
                        digests[p.name] = fut.result
                        pending.append((p.nbytes, fut))
                        held += p.nbytes
                        while len(pending) > 1 and held > PENDING_BYTES:
                            n, done = pending.popleft()
                            done.result()
                            held -= n
                    del t, buf
                    if on_tensor is not None:
                        on_tensor(p)
                for fut in futures:  # the first failure (a NaN found while copying, a read error)
                    fut.result()
                return {name: get() for name, get in digests.items()}
            finally:  # never close the output (or the sources) under a running copy
                for fut in futures:
                    fut.cancel()
                cf.wait(futures)
    finally:
        if own_pool:
            pool.shutdown(wait=True)
        for fd in sources.values():
            with contextlib.suppress(OSError):
                os.close(fd)


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
                  on_tensor: Callable[[PlannedTensor], None] | None = None, pool: cf.Executor | None = None,
                  hashes: bool = True) -> tuple[list[str], dict[str, str]]:
    """Write ``plan`` as ``{prefix}.safetensors`` or shards plus an index; returns (files, digests)."""
    shards = shard_plan(plan, max_shard_bytes)
    if len(shards) == 1:
        names = [f"{prefix}.safetensors"]
    else:
        names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    digests: dict[str, str] = {}
    for name, shard in zip(names, shards):
        digests.update(write_safetensors(directory / name, shard, on_tensor=on_tensor, pool=pool, hashes=hashes))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(p.nbytes for p in plan)},
            "weight_map": {p.name: name for name, shard in zip(names, shards) for p in shard},
        }
        (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names, digests


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

    def tokenizer_files(self) -> list[str]:
        """The tokenizer files that exist, each a name checked to stay inside the model."""
        return [n for n in self.meta.get("tokenizer", []) if contained(self.path, n, f"{self.path / META_FILE}: tokenizer").is_file()]

    def tensors(self):
        return open_tensors(self.weight_paths())

    def state_dict(self) -> dict[str, torch.Tensor]:
        with self.tensors() as src:
            return {k: src.get(k) for k in src.keys()}

    def write_meta(self, meta: dict | None = None) -> None:
        if meta is not None:
            self.meta = meta
        write_json_atomic(self.path / META_FILE, self.meta)


def is_unified(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


_HEX64 = re.compile(r"[0-9a-f]{64}")
_TORCH_DTYPES = {dtype_name(d): code for code, d in ST_DTYPES.items()}


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# key -> (type, what is expected)
_REQUIRED: dict[str, tuple[type, str]] = {
    "family": (str, "the family name (a string)"),
    "config": (dict, "the unified config (an object)"),
    "weights": (list, "a list of weight file names"),
    "tensors": (dict, "the tensor manifest (an object of name -> shape, dtype, sha256)"),
    "tokenizer": (list, "a list of tokenizer file names"),
    "dtype": (str, "the main dtype (a string)"),
    "n_params": (int, "the parameter count (an integer)"),
    "source": (dict, "the provenance (an object)"),
}


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    try:
        raw = meta_path.read_bytes()
    except OSError as e:
        raise StatecastError(f"cannot read {meta_path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StatecastError(f"corrupt {meta_path}: not UTF-8 text (byte {e.start})") from None
    try:
        meta = json.loads(text)
    except RecursionError:
        raise StatecastError(f"corrupt {meta_path}: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise StatecastError(f"corrupt {meta_path}: {e}") from None
    if not isinstance(meta, dict):
        raise StatecastError(f"corrupt {meta_path}: expected a JSON object, got {_kind(meta)}")
    return meta


def _check_meta(path: Path, meta: dict) -> None:
    """Types of ``statecast.json``'s keys, and every path in it inside ``path``."""
    where = path / META_FILE
    if meta.get("format") != FORMAT:
        raise StatecastError(f"{where}: unsupported format {meta.get('format')!r:.60} (this is statecast {__version__}, reads {FORMAT})")
    for key, (typ, what) in _REQUIRED.items():
        if key not in meta:
            raise StatecastError(f"{where}: missing key {key!r}; expected {what}")
        value = meta[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise StatecastError(f"{where}: {key!r} must be {what}, got {_kind(value)}")
    for key in ("weights", "tokenizer"):
        for name in meta[key]:
            if not isinstance(name, str):
                raise StatecastError(f"{where}: {key!r} must be {_REQUIRED[key][1]}, got an entry that is {_kind(name)}")
            contained(path, name, f"{where}: {key!r}")
    if not meta["weights"]:
        raise StatecastError(f"{where}: 'weights' is empty; expected the weight files")
    if len(set(meta["weights"])) != len(meta["weights"]):
        raise StatecastError(f"{where}: 'weights' names a file twice")
    for name, entry in meta["tensors"].items():
        if not isinstance(entry, dict):
            raise StatecastError(f"{where}: tensors[{name!r}] must be an object with shape, dtype and sha256, got {_kind(entry)}")
        shape, dtype, digest = entry.get("shape"), entry.get("dtype"), entry.get("sha256")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise StatecastError(f"{where}: tensors[{name!r}].shape must be a list of non-negative integers, got {shape!r:.60}")
        if dtype not in _TORCH_DTYPES:
            raise StatecastError(f"{where}: tensors[{name!r}].dtype must be one of {', '.join(_TORCH_DTYPES)}, got {dtype!r:.40}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise StatecastError(f"{where}: tensors[{name!r}].sha256 must be 64 lowercase hex digits, got {digest!r:.80}")


def _check_weights(path: Path, meta: dict) -> None:
    """The weight files hold exactly the manifest's tensors, with its shapes and dtypes, and
    are exactly as long as their headers say (readers validate the offsets)."""
    where = path / META_FILE
    manifest = meta["tensors"]
    seen: dict[str, str] = {}
    for f in meta["weights"]:
        fp = path / f
        if not fp.is_file():
            raise StatecastError(f"{path}: weight file {f} is missing")
        layout = safetensors_layout(fp)
        end = max((e for _, _, _, e in layout.tensors.values()), default=layout.data_start)
        if end != layout.size:
            raise StatecastError(f"{fp}: {layout.size} bytes, its header describes {end}")
        for name, (code, shape, _, _) in layout.tensors.items():
            if name in seen:
                raise StatecastError(f"{fp}: tensor {name!r} is also in {seen[name]}; expected each tensor once")
            seen[name] = f
            entry = manifest.get(name)
            if entry is None:
                raise StatecastError(f"{fp}: tensor {name!r} is not in the manifest of {where}")
            if list(shape) != entry["shape"] or _TORCH_DTYPES[entry["dtype"]] != code:
                raise StatecastError(f"{fp}: tensor {name!r} is {list(shape)} {dtype_name(ST_DTYPES[code])} in the file, "
                                     f"{entry['shape']} {entry['dtype']} in {where}")
    missing = [n for n in manifest if n not in seen]
    if missing:
        raise StatecastError(f"{where}: tensor {missing[0]!r} (of {len(missing)} missing) is in none of the weight files "
                             f"{', '.join(meta['weights'])}")


def open_unified(path: Path | str) -> UnifiedModel:
    """Open a unified model after the cheap integrity checks (see the module docstring)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        if not path.exists():
            raise StatecastError(f"no such model: {path}")
        raise StatecastError(f"{path} is not a statecast model (no {META_FILE}); convert it first with `convert pull`")
    meta = _read_meta(path)
    _check_meta(path, meta)
    _check_weights(path, meta)
    return UnifiedModel(path=path, meta=meta)


def verify_tensor_hashes(um: UnifiedModel, progress: Callable[[int], None] | None = None) -> None:
    """Compare every tensor's bytes with its sha256 in the manifest: one read of each file,
    tensors hashed in parallel. A mismatch is an error naming the tensor and the file."""
    manifest = um.meta["tensors"]
    with FileHasher() as hasher:
        jobs = []
        for f in um.weight_paths():
            layout = safetensors_layout(f)
            for name, (_, _, b, e) in sorted(layout.tensors.items(), key=lambda kv: kv[1][2]):
                jobs.append((f, name, e - b, hasher.range(f, b, e)))
        for f, name, nbytes, fut in jobs:
            if fut.result() != manifest[name]["sha256"]:
                raise StatecastError(f"{f}: tensor {name!r} does not match its sha256 in {um.path / META_FILE} "
                                     f"(the model was modified after conversion)")
            if progress is not None:
                progress(nbytes)
