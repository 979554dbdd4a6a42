"""The family registry: every supported family's record, and recognising a checkpoint.

Adding a family is one line in :data:`FAMILIES` (its record lives in its own module here,
its model in ``statecast/arch/``). The registry refuses two families that claim the same
name, Hub ``model_type`` or source format, and detection refuses a native checkpoint that
two families' matchers accept: which family is tried first never decides anything.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints.readers import weight_files
from ..checkpoints.validate import check_tokenizer, contained, first_line, read_json_object
from ..errors import StatecastError
from . import jamba, mamba, mamba2, rwkv, transformer, zamba, zamba2
from .record import Family, HfArch
from .tables import SourceFormat


def _registry(*families: Family) -> dict[str, Family]:
    """name -> record, after checking that no two records claim the same name, model_type or format."""
    seen: dict[str, str] = {}
    for fam in families:
        claims = [f"family {fam.name}"] + [f"model_type {a.model_type}" for a in fam.hf]
        claims += [f"format {fmt.name}" for _, fmt in fam.formats()]
        for claim in claims:
            if claim in seen:
                raise ValueError(f"{claim} is claimed by both {seen[claim]} and {fam.name}")
            seen[claim] = fam.name
    return {f.name: f for f in families}


FAMILIES: dict[str, Family] = _registry(rwkv.FAMILY, mamba.FAMILY, transformer.FAMILY, jamba.FAMILY, mamba2.FAMILY,
                                        zamba.FAMILY, zamba2.FAMILY)
SUPPORTED = "; ".join(
    f"{f.name} ({', '.join([a.architecture for a in f.hf] + ([f.native.fmt.name] if f.native else []))})"
    for f in FAMILIES.values()
)


def format_by_name(name: str) -> tuple[Family, HfArch | None, SourceFormat]:
    """(family, HF architecture or None for a native format, format) for a recorded format name."""
    for fam in FAMILIES.values():
        for arch, fmt in fam.formats():
            if fmt.name == name:
                return fam, arch, fmt
    raise StatecastError(f"unknown source format {name!r}")


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
)
# BlinkDL ships the GPT-NeoX tokenizer of the Pile models under this name.
NATIVE_TOKENIZERS = {"20B_tokenizer.json": "tokenizer.json"}


@dataclass
class Detected:
    """A recognised source checkpoint on local disk."""

    root: Path  # directory (or the .pth file's directory)
    family: Family
    fmt: SourceFormat
    files: list[Path]  # weight files
    hf_config: dict | None  # the source's config.json, if any
    tokenizer: dict[str, Path]  # name in the unified layout -> source file
    arch: HfArch | None = None  # None for a native format

    @property
    def is_native(self) -> bool:
        return self.arch is None

    @property
    def reference_path(self) -> Path:
        """What verify's reference loads: a lone ``.pth`` file itself, else the directory."""
        if self.is_native and len(self.files) == 1 and self.files[0].suffix == ".pth":
            return self.files[0]
        return self.root


def _tokenizer_files(root: Path) -> dict[str, Path]:
    """Tokenizer files by name (unified name -> source file), each checked: inside ``root``,
    JSON files valid JSON objects, ``tokenizer.json`` loadable by the tokenizers library."""
    found = {name: root / name for name in TOKENIZER_FILES if (root / name).is_file()}
    for src, dst in NATIVE_TOKENIZERS.items():
        if (root / src).is_file() and dst not in found:
            found[dst] = root / src
    for name, f in found.items():
        contained(root, f.name, str(root))
        if name == "tokenizer.json":
            check_tokenizer(f)
        elif name.endswith(".json"):
            read_json_object(f)
    return found


def arch_for_model_type(model_type: str | None, where: str) -> tuple[Family, HfArch]:
    for fam in FAMILIES.values():
        for arch in fam.hf:
            if arch.model_type == model_type:
                return fam, arch
    raise StatecastError(f"{where}: unsupported architecture {model_type!r}; supported: {SUPPORTED}")


def _source_keys(files: list[Path]) -> list[str]:
    from ..checkpoints.readers import open_tensors

    with open_tensors(files) as src:
        return src.keys()


def _best_format(formats: tuple[SourceFormat, ...], keys: list[str]) -> SourceFormat:
    """The spelling that names the most source keys (ties: the first)."""
    return max(formats, key=lambda f: sum(f.to_canonical(k) is not None for k in keys))


def detect(path: Path) -> Detected:
    """Recognise a local checkpoint: a Hub-format directory or a native file/directory."""
    path = Path(path)
    if not path.exists():
        raise StatecastError(f"no such file or directory: {path}")
    root = path if path.is_dir() else path.parent
    config_path = root / "config.json"
    cfg = None
    if path.is_dir() and config_path.is_file():
        contained(root, config_path.name, str(root))
        cfg = read_json_object(config_path, allow_infinity=True)
    files = weight_files(path)
    if cfg is not None and "model_type" in cfg:
        fam, arch = arch_for_model_type(cfg.get("model_type"), str(path))
        if not files:
            raise StatecastError(f"{path} has a config.json but no weights (model.safetensors, pytorch_model.bin or shards)")
        fmt = _best_format(arch.formats, _source_keys(files))
        return Detected(root, fam, fmt, files, cfg, _tokenizer_files(root), arch)
    if not files:
        raise StatecastError(f"{path} is not a checkpoint: no config.json, *.safetensors, pytorch_model.bin or *.pth found")
    return _detect_native(root, files, cfg, str(path))


def _detect_native(root: Path, files: list[Path], cfg: dict | None, where: str) -> Detected:
    keys = _source_keys(files)
    try:  # the matchers read the tensor names and the config.json, which can hold anything
        return _match_native(root, files, cfg, where, keys)
    except (ValueError, TypeError, AttributeError, ArithmeticError, IndexError, KeyError) as e:
        raise StatecastError(f"{root / 'config.json' if cfg is not None else where}: {first_line(e)}") from None


def _match_native(root: Path, files: list[Path], cfg: dict | None, where: str, keys: list[str]) -> Detected:
    accepted = [fam for fam in FAMILIES.values() if fam.native is not None and fam.native.match(keys, cfg)]
    if len(accepted) > 1:
        raise StatecastError(f"{where}: the tensor names match the native formats of several families "
                             f"({', '.join(f.native.fmt.name for f in accepted)}); refusing to guess")
    if accepted:
        fam = accepted[0]
        return Detected(root, fam, fam.native.fmt, files, cfg, _tokenizer_files(root))
    for fam in FAMILIES.values():
        reason = fam.native.near_miss(keys, cfg) if fam.native is not None else None
        if reason:
            raise StatecastError(f"{where}: {reason}")
    what = "a config.json without model_type" if cfg is not None else "no config.json"
    raise StatecastError(f"{where}: unrecognised checkpoint ({what}, and the tensor names match no native format); "
                         f"supported: {SUPPORTED}")


def unified_config(det: Detected, shapes: dict[str, tuple[int, ...]]) -> dict:
    """The unified config of a detected checkpoint, every value checked against the model's
    config class (:func:`statecast.arch.layers.config_from_unified`) before anything is
    written; a bad value is named by the config.json key it came from where it has one.
    The format's ``placement`` adds what the tensor names record (``SourceFormat``)."""
    from ..arch.layers import ConfigValueError

    fam = det.family

    def from_source(hf_config: dict | None) -> dict:
        return det.arch.config_from_hf(hf_config) if det.arch else fam.native.config(shapes, hf_config)

    def placed(raw: dict) -> dict:
        return {**raw, **det.fmt.placement(raw, shapes.keys())} if det.fmt.placement else raw

    where = det.root / "config.json" if det.hf_config is not None else det.root
    try:
        cfg_cls, _ = fam.model_classes()
        ucfg = cfg_cls.from_unified(placed(from_source(det.hf_config))).to_unified()
    except ConfigValueError as e:
        key = _source_key(from_source, det.hf_config, e.field) or f"{e.field} (unified config)"
        raise StatecastError(f"{where}: {key}: expected {e.expected}, got {e.value!r:.80}") from None
    except KeyError as e:
        raise StatecastError(f"{where} lacks the field {e.args[0]!r}") from None
    except (ValueError, TypeError, AttributeError, ArithmeticError, IndexError) as e:
        raise StatecastError(f"{where}: {first_line(e)}") from None
    if ucfg.get("n_layer", 0) > len(shapes):  # every layer has at least one tensor
        key = _source_key(from_source, det.hf_config, "n_layer") or "n_layer"
        raise StatecastError(f"{where}: {key}: {ucfg['n_layer']} layers, but the checkpoint holds only {len(shapes)} tensors")
    return ucfg


_PROBES = (object(), 987654321, 0.123456789)  # values that no config holds or computes by accident


def _source_key(from_source, hf_config: dict | None, field: str) -> str | None:
    """The config.json key (``a.b`` when nested) that unified ``field`` comes from, found by
    probing: a marker put under the key comes out in ``field``. None when no key does (the
    value is computed, or there is no config.json)."""
    if not hf_config:
        return None
    paths = [(k,) for k in hf_config] + [(k, j) for k, v in hf_config.items() if isinstance(v, dict) for j in v]
    for path in paths:
        for marker in _PROBES:
            probe = copy.deepcopy(hf_config)
            parent = probe if len(path) == 1 else probe[path[0]]
            parent[path[-1]] = marker
            try:
                value = from_source(probe).get(field)
            except Exception:
                continue
            if value is marker or (type(value) is type(marker) and value == marker):
                return ".".join(path)
    return None


def make_reference(fmt_name: str, path: Path, device, ucfg: dict, dtype=None):
    """verify's reference implementation for a recorded source format (``ucfg``: the unified
    config): transformers' class for a Hub architecture, the native format's own otherwise;
    computing in ``dtype`` (default float32) where it can (``Reference.dtype`` says what it uses)."""
    import torch

    from .references import HfReference

    fam, arch, _ = format_by_name(fmt_name)
    dtype = torch.float32 if dtype is None else dtype
    if arch is not None:
        return HfReference(path, device, arch, ucfg, dtype)
    return fam.native.reference(path, device, fam, ucfg, dtype)
