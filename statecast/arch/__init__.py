"""Model definitions, pure PyTorch, no I/O. ``MODELS`` maps a family to (Config, Model)."""

from .rwkv import Rwkv, RwkvConfig

MODELS = {
    "rwkv": (RwkvConfig, Rwkv),
}
