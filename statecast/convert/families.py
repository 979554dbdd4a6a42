"""The supported families, their checkpoint formats and how to recognise them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints.readers import weight_files
from ..errors import StatecastError
from .tables import SourceFormat


@dataclass(frozen=True)
class HfArch:
    """One Hugging Face architecture (a ``model_type``) that a family reads and writes.

    ``formats`` are spellings of the same tensors (GPT-2 checkpoints saved from
    ``GPT2Model`` lack the ``transformer.`` prefix): the one that names every source
    key is used, and export writes the spelling recorded at conversion (else the first).
    """

    model_type: str
    architecture: str  # transformers class, e.g. "LlamaForCausalLM"; also the verify reference
    formats: tuple[SourceFormat, ...]
    config_from_hf: Callable[[dict], dict]
    hf_config: Callable[[dict, dict | None], dict]  # (unified config, source config.json or None) -> config.json
    reference_kwargs: tuple[tuple[str, object], ...] = ()  # from_pretrained arguments for the reference


@dataclass(frozen=True)
class NativeFormat:
    """A checkpoint format of the family's original authors (no Hugging Face ``model_type``)."""

    fmt: SourceFormat
    match: Callable[[list[str]], bool]  # do these tensor names look like this format?
    config: Callable[[dict, dict | None], dict]  # (source shapes, its config.json or None) -> unified config
    check: Callable[[list[str], str], None] = lambda keys, where: None  # refuse unsupported variants
    export_as: str = ""  # model_type written by `export --format hf`


@dataclass(frozen=True)
class Family:
    name: str
    hf: tuple[HfArch, ...]
    native: NativeFormat | None = None
    keep_fp32: tuple[str, ...] = ()

    def model_classes(self):
        """(ConfigClass, ModelClass) from ``statecast.arch`` (imported on use)."""
        from ..arch import model_classes

        return model_classes(self.name)

    def build(self, ucfg: dict, device: str | torch.device = "cpu"):
        cfg_cls, model_cls = self.model_classes()
        with torch.device(device):
            return model_cls(cfg_cls.from_unified(ucfg))

    def expected_shapes(self, ucfg: dict) -> dict[str, tuple[int, ...]]:
        """Canonical tensor names and shapes, read off the model built on the meta device."""
        return {k: tuple(v.shape) for k, v in self.build(ucfg, "meta").state_dict().items()}

    def keeps_fp32(self, name: str) -> bool:
        return any(name.endswith(s) for s in self.keep_fp32)

    def arch(self, model_type: str) -> HfArch:
        return next(a for a in self.hf if a.model_type == model_type)

    def formats(self) -> list[SourceFormat]:
        out = [f for a in self.hf for f in a.formats]
        return out + ([self.native.fmt] if self.native else [])


def _registry() -> dict[str, Family]:
    from . import mamba as mamba_formats
    from . import rwkv as rwkv_formats
    from . import transformer as transformer_formats

    families = [rwkv_formats.FAMILY, mamba_formats.FAMILY, transformer_formats.FAMILY]
    return {f.name: f for f in families}


FAMILIES: dict[str, Family] = _registry()
SUPPORTED = "; ".join(
    f"{f.name} ({', '.join([a.architecture for a in f.hf] + ([f.native.fmt.name] if f.native else []))})"
    for f in FAMILIES.values()
)


def format_by_name(name: str) -> tuple[Family, HfArch | None, SourceFormat]:
    """(family, HF architecture or None for a native format, format) for a recorded format name."""
    for fam in FAMILIES.values():
        for arch in fam.hf:
            for fmt in arch.formats:
                if fmt.name == name:
                    return fam, arch, fmt
        if fam.native and fam.native.fmt.name == name:
            return fam, None, fam.native.fmt
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
    found = {name: root / name for name in TOKENIZER_FILES if (root / name).is_file()}
    for src, dst in NATIVE_TOKENIZERS.items():
        if (root / src).is_file() and dst not in found:
            found[dst] = root / src
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
        try:
            cfg = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise StatecastError(f"{config_path} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise StatecastError(f"{config_path} is not a JSON object")
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
    for fam in FAMILIES.values():
        if fam.native is not None and fam.native.match(keys):
            fam.native.check(keys, where)
            return Detected(root, fam, fam.native.fmt, files, cfg, _tokenizer_files(root))
    what = "a config.json without model_type" if cfg is not None else "no config.json"
    raise StatecastError(f"{where}: unrecognised checkpoint ({what}, and the tensor names match no native format); "
                         f"supported: {SUPPORTED}")


def unified_config(det: Detected, shapes: dict[str, tuple[int, ...]]) -> dict:
    fam = det.family
    where = det.root / "config.json"
    try:
        cfg = det.arch.config_from_hf(det.hf_config) if det.arch else fam.native.config(shapes, det.hf_config)
        cfg_cls, _ = fam.model_classes()
        return cfg_cls.from_unified(cfg).to_unified()
    except KeyError as e:
        raise StatecastError(f"{where} lacks the field {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise StatecastError(f"{where}: {e}") from None
