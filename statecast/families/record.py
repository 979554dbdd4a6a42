"""The family record: every fact the pipeline needs about one family, in one place.

A family is its model file in ``statecast/arch/`` and one :class:`Family` record (in its
``statecast/families/<name>.py``, listed once in ``statecast/families/__init__.py``). pull,
verify, export, generate, inspect, demo and the CLI read these records and name no family.

    Family                        one per model file
      model                       (arch module, config class, model class), imported on use
      hf: HfArch ...              the Hub architectures it reads and writes
        model_type, architecture  config.json's model_type; the transformers class (verify's reference)
        formats                   name tables (spellings of the same tensors)
        config_from_hf, hf_config the config maps both ways
        reference_kwargs          from_pretrained arguments of the reference
        genai_type                onnxruntime-genai's model type for a KV-only export (None: none)
      native: NativeFormat        the original authors' format, if any
        match / near_miss         detection, and the message for a checkpoint that is close but unsupported
        config, reference         the unified config from the tensors; verify's reference factory
      state                       ONNX names of the model's state fields (StateField)
      onnx_dynamic_length         whether the exported graph takes T > 1
      demo: Demo                  the builder of a tiny seeded Hub-format checkpoint (demo and tests)
      kernels                     whole-sequence implementations a user may choose ("torch" first)
      keep_fp32                   tensors kept in float32 whatever --dtype says
      tolerances                  overrides of verify's tolerance table, by dtype
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Callable

import torch

from .tables import SourceFormat


@dataclass(frozen=True)
class StateField:
    """How one field of a model's state NamedTuple appears in an exported graph."""

    suffix: str  # past_key_values.{i}.{suffix} -> present.{i}.{suffix}
    length_axis: int | None = None  # axis of one layer's tensor that grows by T per call (the KV history)


# attention: [B, Hkv, P, D] -> [B, Hkv, P+T, D] (onnxruntime-genai's names)
KV_STATE = {"key": StateField("key", length_axis=2), "value": StateField("value", length_axis=2)}
# a Mamba layer: [B, E, W-1] last conv inputs, [B, E, N] SSM state (float32)
MAMBA_STATE = {"conv": StateField("conv_state"), "ssm": StateField("recurrent_state")}


def write_hf_config(ucfg: dict, base: dict | None, defaults: dict, architecture: str, model_type: str,
                    fields: dict[str, str], **extra) -> dict:
    """A ``config.json`` for a Hub architecture: the source's own config (``base``, whose other
    fields are kept) or ``defaults``, with the architecture, ``model_type``, every
    ``fields`` entry (config.json key -> unified key) and ``extra`` (computed values) set."""
    cfg = dict(base or defaults)
    cfg.update(architectures=[architecture], model_type=model_type, **{k: ucfg[u] for k, u in fields.items()}, **extra)
    return cfg


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
    genai_type: str | None = None  # onnxruntime-genai's model type for its KV-only export


@dataclass(frozen=True)
class NativeFormat:
    """A checkpoint format of the family's original authors (no Hugging Face ``model_type``).

    ``match(keys, config)`` must accept exactly this format: detection runs every family's
    matcher, and two that accept one checkpoint are an error. ``near_miss(keys, config)``
    names what makes a checkpoint that no family accepts unsupported (a later version, a
    variant), or returns None when it does not look like this format at all.
    ``reference(path, device, family, unified config, dtype)`` is verify's reference.
    """

    fmt: SourceFormat
    match: Callable[[list[str], dict | None], bool]
    config: Callable[[dict, dict | None], dict]  # (source shapes, its config.json or None) -> unified config
    reference: Callable
    near_miss: Callable[[list[str], dict | None], str | None] = lambda keys, cfg: None
    export_as: str = ""  # model_type written by `export --format hf`


@dataclass(frozen=True)
class Demo:
    """A tiny seeded checkpoint in Hub format with a tokenizer: ``convert demo`` and the tests."""

    name: str  # the store name of the demo model
    description: str
    build: Callable[..., Path]  # build(out, seed=0, **dims) -> the checkpoint directory


@dataclass(frozen=True)
class Family:
    name: str
    model: tuple[str, str, str]  # (module in statecast.arch, config class, model class)
    hf: tuple[HfArch, ...]
    state: dict[str, StateField]
    demo: Demo
    native: NativeFormat | None = None
    onnx_dynamic_length: bool = False
    kernels: tuple[str, ...] = ("torch",)
    keep_fp32: tuple[str, ...] = ()
    tolerances: dict[str, dict[str, float]] = field(default_factory=dict)

    def model_classes(self):
        """(ConfigClass, ModelClass) from ``statecast.arch`` (imported on use: converting an
        RWKV checkpoint never imports the Transformer code)."""
        module, cfg_name, model_name = self.model
        mod = import_module(f"statecast.arch.{module}")
        return getattr(mod, cfg_name), getattr(mod, model_name)

    def build(self, ucfg: dict, device: str | torch.device = "cpu"):
        cfg_cls, model_cls = self.model_classes()
        with torch.device(device):
            return model_cls(cfg_cls.from_unified(ucfg))

    def expected_shapes(self, ucfg: dict) -> dict[str, tuple[int, ...]]:
        """Canonical tensor names and shapes, read off the model built on the meta device."""
        return {k: tuple(v.shape) for k, v in self.build(ucfg, "meta").state_dict().items()}

    def keeps_fp32(self, name: str) -> bool:
        return any(name.endswith(s) for s in self.keep_fp32)

    def storage_dtype(self, name: str, dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
        """The dtype tensor ``name`` (now ``dtype``) takes when the user asks for ``target``
        (None: unchanged): floating tensors are cast, except the ones kept in float32."""
        if target is None or not dtype.is_floating_point:
            return dtype
        return torch.float32 if self.keeps_fp32(name) else target

    def arch(self, model_type: str) -> HfArch:
        return next(a for a in self.hf if a.model_type == model_type)

    def formats(self) -> list[tuple[HfArch | None, SourceFormat]]:
        """Every source format of the family with its architecture (None: the native one)."""
        out: list[tuple[HfArch | None, SourceFormat]] = [(a, f) for a in self.hf for f in a.formats]
        return out + ([(None, self.native.fmt)] if self.native else [])
