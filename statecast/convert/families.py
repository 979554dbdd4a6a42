"""The supported families, their checkpoint formats and how to recognise them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints.readers import weight_files
from ..errors import StatecastError
from . import rwkv as rwkv_formats
from .tables import SourceFormat


@dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple[str, ...]
    hf_architecture: str
    hf: SourceFormat
    config_from_hf: Callable[[dict], dict]
    hf_config: Callable[[dict, dict | None], dict]
    native: SourceFormat | None = None
    config_from_native: Callable[[dict], dict] | None = None
    native_match: Callable[[list[str]], bool] | None = None  # do these tensor names look like `native`?
    native_check: Callable[[list[str], str], None] | None = None  # refuse unsupported variants
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


FAMILIES: dict[str, Family] = {
    "rwkv": Family(
        name="rwkv",
        hf_model_types=("rwkv",),
        hf_architecture="RwkvForCausalLM",
        hf=rwkv_formats.HF,
        config_from_hf=rwkv_formats.config_from_hf,
        hf_config=rwkv_formats.hf_config,
        native=rwkv_formats.NATIVE,
        config_from_native=rwkv_formats.config_from_native,
        native_match=rwkv_formats.is_native,
        native_check=rwkv_formats.check_native_version,
        keep_fp32=rwkv_formats.KEEP_FP32,
    ),
}

SUPPORTED = "rwkv (Hugging Face RwkvForCausalLM, BlinkDL RWKV-4 .pth)"

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


def _tokenizer_files(root: Path) -> dict[str, Path]:
    found = {name: root / name for name in TOKENIZER_FILES if (root / name).is_file()}
    for src, dst in NATIVE_TOKENIZERS.items():
        if (root / src).is_file() and dst not in found:
            found[dst] = root / src
    return found


def family_for_model_type(model_type: str | None, where: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.hf_model_types:
            return fam
    raise StatecastError(f"{where}: unsupported architecture {model_type!r}; supported: {SUPPORTED}")


def detect(path: Path) -> Detected:
    """Recognise a local checkpoint: a Hub-format directory or a native file/directory."""
    path = Path(path)
    if not path.exists():
        raise StatecastError(f"no such file or directory: {path}")
    root = path if path.is_dir() else path.parent
    config_path = root / "config.json"
    if path.is_dir() and config_path.is_file():
        try:
            cfg = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise StatecastError(f"{config_path} is not valid JSON: {e}") from None
        fam = family_for_model_type(cfg.get("model_type"), str(path))
        files = weight_files(path)
        if not files:
            raise StatecastError(f"{path} has a config.json but no weights (model.safetensors, pytorch_model.bin or shards)")
        return Detected(root, fam, fam.hf, files, cfg, _tokenizer_files(root))
    files = weight_files(path)
    if not files:
        raise StatecastError(f"{path} is not a checkpoint: no config.json, *.safetensors, pytorch_model.bin or *.pth found")
    return _detect_native(root, files, str(path))


def _detect_native(root: Path, files: list[Path], where: str) -> Detected:
    from ..checkpoints.readers import open_tensors

    with open_tensors(files) as src:
        keys = src.keys()
    for fam in FAMILIES.values():
        if fam.native_match is not None and fam.native_match(keys):
            fam.native_check(keys, where)
            return Detected(root, fam, fam.native, files, None, _tokenizer_files(root))
    raise StatecastError(f"{where}: unrecognised checkpoint (no config.json, and the tensor names match no native format); supported: {SUPPORTED}")


def unified_config(det: Detected, shapes: dict[str, tuple[int, ...]]) -> dict:
    fam = det.family
    if det.hf_config is not None:
        try:
            cfg = fam.config_from_hf(det.hf_config)
        except KeyError as e:
            raise StatecastError(f"{det.root / 'config.json'} lacks the field {e.args[0]!r}") from None
    else:
        cfg = fam.config_from_native(shapes)
    cfg_cls, _ = fam.model_classes()
    return cfg_cls.from_unified(cfg).to_unified()
