"""Typed checks for the files statecast reads from a checkpoint (the validation boundary).

Every check raises :class:`~statecast.errors.StatecastError` with one line that names the
file, the key and what was expected, before anything is written:

* :func:`read_json_object` — a UTF-8 JSON object (config.json, index files, tokenizer JSON),
  no ``NaN``/``Infinity``, not nested deeply enough to make the parser recurse;
* :func:`check_safetensors_header` — a safetensors header: typed entries whose offsets tile
  the data region exactly (no overlaps, no holes, nothing after the last tensor);
* :func:`contained` — a path named by (or found in) a checkpoint directory that stays inside
  it, symlinks included;
* :func:`check_tokenizer` — a ``tokenizer.json`` that ``tokenizers`` can load;
* :func:`check_weight_dtypes` — floating tensors where the model expects weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import StatecastError

MAX_HEADER_BYTES = 100_000_000
MAX_DIM = 2**63 - 1


def first_line(e: BaseException) -> str:
    """An exception's message as one line (at most 300 characters) for a StatecastError."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# --------------------------------------------------------------------------- JSON


def parse_json(raw: bytes, where: object, what: str = "JSON", object_pairs_hook=None) -> object:
    """``raw`` (UTF-8) as JSON; anything else, and nesting deep enough to make the parser
    recurse, is an error naming ``where``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StatecastError(f"{where}: {what} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise StatecastError(f"{where}: {what} is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, a duplicate key
        raise StatecastError(f"{where}: {what} is not valid JSON ({first_line(e)})") from None


def read_json_object(path: Path, what: str = "", allow_infinity: bool = False) -> dict:
    """A JSON file that must hold an object (config.json, an index, a tokenizer file), with
    no ``NaN`` anywhere and, unless ``allow_infinity``, no ``Infinity`` (Python's json accepts
    both). A source config.json allows ``Infinity``: transformers writes an unbounded limit
    that way (Mamba-2's ``time_step_limit: [0.0, Infinity]``), and every value statecast takes
    from it passes the typed, ranged checks of the unified config."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise StatecastError(f"cannot read {path}: {e.strerror or first_line(e)}") from None
    obj = parse_json(raw, path, what or "the file")
    if not isinstance(obj, dict):
        raise StatecastError(f"{path}: expected a JSON object, got {_json_type(obj)}")
    stack: list[tuple[str, object]] = [("", obj)]
    while stack:  # iterative: a deeply nested file must not exhaust the recursion limit here
        key, value = stack.pop()
        if isinstance(value, float) and not (math.isfinite(value) or allow_infinity and not math.isnan(value)):
            raise StatecastError(f"{path}: {key}: expected a finite number, got {value}")
        if isinstance(value, dict):
            stack.extend((f"{key}.{k}" if key else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{key}[{i}]", v) for i, v in enumerate(value))
    return obj


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- safetensors


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_safetensors_header(path: Path, raw: bytes, file_size: int, itemsizes: dict[str, int]) -> dict:
    """Parse the header bytes ``raw`` of safetensors file ``path`` (``file_size`` bytes) and
    check it: a JSON object of tensor entries (``dtype`` one of ``itemsizes``, ``shape`` a list
    of non-negative integers, ``data_offsets`` ``[begin, end]`` spanning exactly the tensor's
    bytes) whose offsets tile the data region with no overlap, hole or trailing byte, and an
    optional ``__metadata__`` of str -> str. Returns the header."""
    where = f"corrupt safetensors file {path}"
    header = parse_json(raw, where, "header", object_pairs_hook=_no_duplicates)
    if not isinstance(header, dict):
        raise StatecastError(f"{where}: the header must be a JSON object, got {_json_type(header)}")
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise StatecastError(f"{where}: __metadata__ must be an object of strings, got {info!r:.80}")
            continue
        if not isinstance(info, dict):
            raise StatecastError(f"{where}: tensor {name!r} must be an object with dtype, shape and data_offsets, "
                                 f"got {_json_type(info)}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in itemsizes:
            raise StatecastError(f"unsupported dtype {dtype!r:.40} for tensor {name!r} in {path}; "
                                 f"expected one of {', '.join(itemsizes)}")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
            raise StatecastError(f"{where}: tensor {name!r}: shape must be a list of non-negative integers, "
                                 f"got {shape!r:.80}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise StatecastError(f"{where}: tensor {name!r}: data_offsets must be [begin, end] with "
                                 f"0 <= begin <= end, got {offsets!r:.80}")
        nbytes = math.prod(shape) * itemsizes[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise StatecastError(f"{where}: tensor {name!r} {shape} {dtype} needs {nbytes} bytes, "
                                 f"its data_offsets {offsets} span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end, last = 0, None
    for begin, stop, name in sorted(spans):
        if begin < end:
            raise StatecastError(f"{where}: tensor {name!r} data_offsets [{begin}, {stop}] overlap tensor {last!r} "
                                 f"(which ends at {end})")
        if begin > end:
            raise StatecastError(f"{where}: {begin - end} unindexed bytes before tensor {name!r} "
                                 f"(data_offsets [{begin}, {stop}], expected begin {end})")
        end, last = stop, name
    expected = 8 + len(raw) + end
    if expected > file_size:
        raise StatecastError(f"truncated safetensors file {path}: tensors need {expected} bytes, the file has {file_size}")
    if expected < file_size:
        raise StatecastError(f"{where}: {file_size - expected} bytes after the last tensor "
                             f"(the header indexes {expected} bytes, the file has {file_size})")
    return header


# --------------------------------------------------------------------------- paths


def _blob_roots(root: Path) -> list[Path]:
    """The Hugging Face cache's ``blobs`` directory when ``root`` is (inside) a snapshot,
    ``models--org--name/snapshots/<commit>``, whose files are symlinks to ``../../blobs/<hash>``."""
    for d in (root, *root.parents):
        if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
            return [d.parent.parent / "blobs"]
    return []


def contained(root: Path, name: str | Path, what: str) -> Path:
    """``root / name``, refusing a name that is absolute or climbs out with ``..``, and a file
    whose symlinks resolve outside ``root`` (``what`` names the file the name came from)."""
    if not isinstance(name, (str, Path)) or not str(name) or "\x00" in str(name):
        raise StatecastError(f"{what}: expected a file name inside {root}, got {name!r}")
    text = str(name)
    pure = (PurePosixPath(text), PureWindowsPath(text))
    if any(p.is_absolute() or p.anchor or ".." in p.parts for p in pure):
        raise StatecastError(f"{what}: {text!r} leaves the checkpoint directory {root}; "
                             f"expected a relative path inside it")
    path = Path(root) / text
    real_root = Path(root).resolve()
    real = path.resolve()
    if not any(real.is_relative_to(r) for r in [real_root, *_blob_roots(real_root)]):
        raise StatecastError(f"{what}: {path} resolves to {real}, outside the checkpoint directory {root}")
    return path


# --------------------------------------------------------------------------- tokenizer


def check_tokenizer(path: Path) -> None:
    """A ``tokenizer.json`` that the ``tokenizers`` library loads (it may panic: caught)."""
    from tokenizers import Tokenizer

    read_json_object(path, "tokenizer.json")
    try:
        Tokenizer.from_file(str(path))
    except BaseException as e:  # pyo3's PanicException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise StatecastError(f"{path}: not a tokenizer the tokenizers library can load ({first_line(e)})") from None


# --------------------------------------------------------------------------- weights


def check_weight_dtypes(src, where: object, keys=None) -> None:
    """Every weight the model consumes is floating point (all families' weights are): an
    integer or bool tensor in a float role is refused. ``src`` is a ``TensorSource``; ``keys``
    the source keys to check (default: all; pass the mapped ones to ignore dropped buffers)."""
    bad = [k for k in (src.keys() if keys is None else keys) if not src.dtype(k).is_floating_point]
    if bad:
        shown = ", ".join(f"{k} ({str(src.dtype(k)).removeprefix('torch.')})" for k in sorted(bad)[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise StatecastError(f"{where}: tensors {shown}{more} are not floating point; expected float weights")
