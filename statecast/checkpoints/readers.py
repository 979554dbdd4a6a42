"""Lazy tensor readers for checkpoint files.

Every reader exposes the same small interface (:class:`TensorSource`): the key
list, each tensor's shape and dtype without reading its data, and ``get(name)``
that materialises one tensor. Conversion walks keys one at a time, so peak memory
is about one tensor.

Formats: single and sharded safetensors (``*.safetensors.index.json``),
``pytorch_model.bin`` (single or sharded) and native ``.pth`` files. Torch pickles
are opened with ``torch.load(weights_only=True, mmap=True)``: the restricted
unpickler refuses anything but tensors and plain containers, so a malicious
pickle is an error, never code execution.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import pickle
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import StatecastError
from .validate import MAX_HEADER_BYTES, check_safetensors_header, contained, first_line, read_json_object

# safetensors dtype codes <-> torch dtypes (shared with the writer).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_CODES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
ST_ITEMSIZES: dict[str, int] = {k: v.itemsize for k, v in ST_DTYPES.items()}

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise StatecastError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}") from None


@dataclass
class TensorSource:
    """Keys -> (file, shape, dtype); ``get`` reads one tensor lazily."""

    files: list[Path]
    _where: dict[str, Path] = field(default_factory=dict)
    _meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    _handles: dict[Path, object] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        path = self._where[name]
        handle = self._handles[path]
        if isinstance(handle, dict):  # a torch pickle, memory-mapped
            return handle[name]
        return handle.read(name, *self._meta[name])

    def close(self) -> None:
        for handle in self._handles.values():
            if isinstance(handle, _SafetensorsFile):
                handle.file.close()
        self._handles.clear()

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header (:func:`validate.check_safetensors_header`):
    a short, corrupt or inconsistent file is an error naming the file and the tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StatecastError(f"truncated safetensors file {path}: {size} bytes, no header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise StatecastError(f"truncated or corrupt safetensors file {path}: header of {n} bytes in a {size}-byte file")
        raw = f.read(n)
    return check_safetensors_header(path, raw, size, ST_ITEMSIZES)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


@dataclass
class _SafetensorsFile:
    """An open safetensors file; ``read`` maps one tensor's bytes (copy-on-write, zero-copy).

    Each tensor gets its own small memory map, unmapped when the tensor is freed, so
    a conversion that streams tensors keeps about one tensor resident, where a map
    of the whole file would keep every page read so far (the whole checkpoint by the
    end). Mapping, unlike reading into fresh memory, touches no new anonymous pages.
    """

    path: Path
    file: io.RawIOBase
    data_start: int  # 8 + header length
    offsets: dict[str, tuple[int, int]]

    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        begin, end = self.offsets[name]
        nbytes = _nbytes(shape, dtype)
        if begin < 0 or end - begin != nbytes:
            raise StatecastError(
                f"corrupt safetensors file {self.path}: tensor {name!r} {list(shape)} {dtype_name(dtype)} "
                f"needs {nbytes} bytes, its offsets span {end - begin}"
            )
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        start = self.data_start + begin
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(self.file.fileno(), start + nbytes - base, offset=base, access=mmap.ACCESS_COPY)
        # frombuffer keeps ``mm`` alive as long as the tensor (or a view of it) is.
        return torch.frombuffer(mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=start - base).reshape(shape)


def _claim(src: TensorSource, name: str, path: Path) -> None:
    if name in src._where:
        raise StatecastError(f"tensor {name!r} is in both {src._where[name]} and {path}; expected each tensor once")
    src._where[name] = path


def _add_safetensors(src: TensorSource, path: Path) -> None:
    header = read_safetensors_header(path)
    f = open(path, "rb", buffering=0)
    (n,) = struct.unpack("<Q", f.read(8))
    offsets = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _claim(src, name, path)
        src._meta[name] = (tuple(info["shape"]), ST_DTYPES[info["dtype"]])
        offsets[name] = tuple(info["data_offsets"])
    src._handles[path] = _SafetensorsFile(path, f, 8 + n, offsets)


# --------------------------------------------------------------------------- torch pickles


# torch.load honours this variable to turn a load without ``weights_only`` into a full
# unpickle (older versions even overrode an explicit ``weights_only=True``): never for us.
UNSAFE_TORCH_ENV = ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",)
_env_lock = threading.Lock()


@contextlib.contextmanager
def restricted_unpickling():
    """Run ``torch.load`` calls with the variables that could lift ``weights_only`` removed."""
    with _env_lock:
        saved = {n: os.environ.pop(n) for n in UNSAFE_TORCH_ENV if n in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def load_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` restricted to tensors, memory-mapped when the file allows it."""
    try:
        with restricted_unpickling():
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise StatecastError(
            f"refusing to load {path}: it is not a plain tensor checkpoint (unsafe pickle: {first_line(e)})"
        ) from None
    except Exception as e:  # a corrupt file raises anything: EOFError, KeyError, UnicodeDecodeError...
        raise StatecastError(f"cannot read {path}: {first_line(e)} ({type(e).__name__})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise StatecastError(f"{path} does not hold a flat name -> tensor dictionary")
    return obj


def _add_torch(src: TensorSource, path: Path) -> None:
    sd = load_torch_pickle(path)
    src._handles[path] = sd
    for name, t in sd.items():
        _claim(src, name, path)
        src._meta[name] = (tuple(t.shape), t.dtype)


# --------------------------------------------------------------------------- entry point

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory or file, preferring safetensors.

    A path named by an index, or a file found in the directory, must stay inside the
    directory (no absolute path, no ``..``, no symlink out of it): a checkpoint from the Hub
    must never make statecast read the user's own files."""
    path = Path(path)
    if path.is_file():
        return [path]
    for index in WEIGHT_INDEXES:
        if (path / index).is_file():
            return _shards(path, path / index)
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return [contained(path, name, str(path))]
    pth = sorted(path.glob("*.pth"))
    if len(pth) == 1:
        return [contained(path, pth[0].name, str(path))]
    if len(pth) > 1:
        raise StatecastError(f"{path} holds several .pth files ({', '.join(p.name for p in pth)}); pass one")
    return []


def _shards(root: Path, index: Path) -> list[Path]:
    contained(root, index.name, str(root))
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise StatecastError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file, "
                             f"got {weight_map!r:.80}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise StatecastError(f"{index}: weight_map[{name!r}] must be a shard file name, got {shard!r:.80}")
    files = sorted({contained(root, f, f"{index}: weight_map") for f in weight_map.values()})
    missing = [str(f.relative_to(root)) for f in files if not f.is_file()]
    if missing:
        raise StatecastError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
    return files


def open_tensors(files: list[Path]) -> TensorSource:
    src = TensorSource(files=list(files))
    for f in files:
        if f.suffix == ".safetensors":
            _add_safetensors(src, f)
        elif f.suffix in (".bin", ".pth", ".pt"):
            _add_torch(src, f)
        else:
            raise StatecastError(f"unsupported weight file {f}: expected .safetensors, .bin or .pth")
    return src
