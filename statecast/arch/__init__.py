"""Model definitions, pure PyTorch, no I/O.

``MODELS`` maps a family to the module and class names of its (Config, Model);
:func:`model_classes` imports the family's module on first use, so converting an
RWKV checkpoint never imports the Transformer code and vice versa.
"""

from __future__ import annotations

from importlib import import_module

MODELS: dict[str, tuple[str, str, str]] = {
    "rwkv": ("rwkv", "RwkvConfig", "Rwkv"),
    "mamba": ("mamba", "MambaConfig", "Mamba"),
    "transformer": ("transformer", "TransformerConfig", "Transformer"),
    "jamba": ("jamba", "JambaConfig", "Jamba"),
}


def model_classes(family: str):
    """(ConfigClass, ModelClass) of ``family``."""
    module, cfg_name, model_name = MODELS[family]
    mod = import_module(f"{__name__}.{module}")
    return getattr(mod, cfg_name), getattr(mod, model_name)
