"""Run exported graphs without torch: onnxruntime + numpy + tokenizers only.

``OnnxModel(path)`` drives an ``onnx/`` export one call per token with the state as explicit
arrays; :func:`generate` is ``convert generate --runtime onnx``. Nothing in this package
imports torch, not even transitively (a test runs it with torch made unimportable).
"""

from .ort import FORMAT, OnnxModel, find_export, generate, load_description, make_session, provider_name

__all__ = ["FORMAT", "OnnxModel", "find_export", "generate", "load_description", "make_session", "provider_name"]
