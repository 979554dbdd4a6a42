"""RWKV-4 checkpoint formats: Hugging Face ``RwkvForCausalLM`` and BlinkDL's native ``.pth``.

Both are plain renames of the same tensors (the HF layout was produced from the
native one by transformers' ``convert_rwkv_checkpoint_to_hf.py``); the only
numeric transform is squeezing the ``[1, 1, C]`` time-mix coefficients to ``[C]``.
"""

from __future__ import annotations

import contextlib
import io
import os
from importlib import metadata
from pathlib import Path

import torch

from ..errors import StatecastError
from .builders import seeded_checkpoint
from .record import Demo, Family, HfArch, NativeFormat, StateField, write_hf_config
from .references import Reference
from .tables import Rule, SourceFormat


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.weight"), Rule(f"{src}.bias", f"{dst}.bias")]


def _rules(*, emb: str, ln0: str, block: str, ln1: str, ln2: str, att: str, ffn: str, mix: dict[str, str],
           ln_out: str, head: str) -> tuple[Rule, ...]:
    """One table shape for both formats; only the source spellings differ."""
    b, sq = f"{block}.{{i}}", "squeeze_1_1_c"
    return tuple(
        [Rule(emb, "embed.weight"), *_norm(ln0, "embed_norm"), *_norm(ln_out, "final_norm"), Rule(head, "lm_head.weight")]
        + _norm(f"{b}.{ln1}", "layers.{i}.mixer_norm")
        + _norm(f"{b}.{ln2}", "layers.{i}.mlp_norm")
        + [
            Rule(f"{b}.{att}.time_decay", "layers.{i}.time_mix.decay"),
            Rule(f"{b}.{att}.time_first", "layers.{i}.time_mix.bonus"),
            Rule(f"{b}.{att}.{mix['k']}", "layers.{i}.time_mix.mix_k", sq),
            Rule(f"{b}.{att}.{mix['v']}", "layers.{i}.time_mix.mix_v", sq),
            Rule(f"{b}.{att}.{mix['r']}", "layers.{i}.time_mix.mix_r", sq),
            Rule(f"{b}.{att}.key.weight", "layers.{i}.time_mix.key.weight"),
            Rule(f"{b}.{att}.value.weight", "layers.{i}.time_mix.value.weight"),
            Rule(f"{b}.{att}.receptance.weight", "layers.{i}.time_mix.receptance.weight"),
            Rule(f"{b}.{att}.output.weight", "layers.{i}.time_mix.output.weight"),
            Rule(f"{b}.{ffn}.{mix['k']}", "layers.{i}.mlp.mix_k", sq),
            Rule(f"{b}.{ffn}.{mix['r']}", "layers.{i}.mlp.mix_r", sq),
            Rule(f"{b}.{ffn}.key.weight", "layers.{i}.mlp.up.weight"),
            Rule(f"{b}.{ffn}.value.weight", "layers.{i}.mlp.down.weight"),
            Rule(f"{b}.{ffn}.receptance.weight", "layers.{i}.mlp.receptance.weight"),
        ]
    )


HF = SourceFormat(
    name="rwkv-hf",
    rules=_rules(
        emb="rwkv.embeddings.weight", ln0="rwkv.blocks.0.pre_ln", block="rwkv.blocks", ln1="ln1", ln2="ln2",
        att="attention", ffn="feed_forward",
        mix={"k": "time_mix_key", "v": "time_mix_value", "r": "time_mix_receptance"},
        ln_out="rwkv.ln_out", head="head.weight",
    ),
)

NATIVE = SourceFormat(
    name="rwkv-native",
    rules=_rules(
        emb="emb.weight", ln0="blocks.0.ln0", block="blocks", ln1="ln1", ln2="ln2", att="att", ffn="ffn",
        mix={"k": "time_mix_k", "v": "time_mix_v", "r": "time_mix_r"},
        ln_out="ln_out", head="head.weight",
    ),
)

# Markers of later RWKV generations in native checkpoints (BlinkDL's rwkv package
# uses the same markers to tell versions apart).
# A marker matches the start of one dotted segment of a tensor name.
_LATER_VERSIONS = {"ln_x": "RWKV-5", "gate": "RWKV-5.x", "time_maa": "RWKV-6", "time_faaaa": "RWKV-6", "x_r": "RWKV-7"}


def _looks_native(keys: list[str]) -> bool:
    return "emb.weight" in keys and any(k.startswith("blocks.") and ".att." in k for k in keys)


def _later_version(keys: list[str]) -> tuple[str, str] | None:
    """(version, the key that shows it) for a native checkpoint of a later RWKV generation."""
    for k in keys:
        for marker, version in _LATER_VERSIONS.items():
            if any(seg.startswith(marker) for seg in k.split(".")):
                return version, k
    return None


def is_native(keys: list[str], cfg: dict | None = None) -> bool:
    """BlinkDL's RWKV-4 ``.pth``: its tensor names, and none of a later generation's."""
    return _looks_native(keys) and _later_version(keys) is None


def native_near_miss(keys: list[str], cfg: dict | None = None) -> str | None:
    later = _later_version(keys) if _looks_native(keys) else None
    if later is None:
        return None
    version, key = later
    return f"{version} native checkpoints are not supported (found {key}); RWKV-4 only"


def config_from_hf(cfg: dict) -> dict:
    d = cfg["hidden_size"]
    return {
        "vocab_size": cfg["vocab_size"],
        "d_model": d,
        "n_layer": cfg["num_hidden_layers"],
        "d_attn": cfg.get("attention_hidden_size") or d,
        "d_ffn": cfg.get("intermediate_size") or 4 * d,
        "norm_eps": cfg.get("layer_norm_epsilon", 1e-5),
        "final_norm_eps": 1e-5,  # transformers builds ln_out with LayerNorm's default eps
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def config_from_native(shapes: dict[str, tuple[int, ...]], cfg: dict | None = None) -> dict:
    """Native ``.pth`` files carry no config: read the dimensions off the tensors."""
    n_layer = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    vocab, d = shapes["emb.weight"]
    return {
        "vocab_size": vocab,
        "d_model": d,
        "n_layer": n_layer,
        "d_attn": shapes["blocks.0.att.key.weight"][0],
        "d_ffn": shapes["blocks.0.ffn.key.weight"][0],
        "norm_eps": 1e-5,
        "final_norm_eps": 1e-5,
        "tie_embeddings": "head.weight" not in shapes,
    }


# config.json key -> unified key, for the fields that map one to one
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layer",
             "attention_hidden_size": "d_attn", "intermediate_size": "d_ffn", "layer_norm_epsilon": "norm_eps",
             "tie_word_embeddings": "tie_embeddings"}


def hf_config(ucfg: dict, base: dict | None = None) -> dict:
    """A ``config.json`` for ``RwkvForCausalLM``; ``base`` (the source's own config) keeps its other fields."""
    defaults = {"bos_token_id": 0, "eos_token_id": 0, "context_length": 1024, "rescale_every": 6, "use_cache": True}
    return write_hf_config(ucfg, base, defaults, "RwkvForCausalLM", "rwkv", HF_FIELDS)


# Kept in float32 whatever --dtype says: the WKV decay and bonus feed exp(), as
# transformers' `_keep_in_fp32_modules = ["time_decay", "time_first"]` does.
KEEP_FP32 = ("time_mix.decay", "time_mix.bonus")


class RwkvPackageReference(Reference):
    """BlinkDL's ``rwkv`` package (``rwkv.model.RWKV``), strategy ``<device> fp32``, one sequence at a time.

    The package exposes no per-layer states, so per-layer comparison truncates its
    layer loop and reads the residual stream through its own final LayerNorm with
    unit weight and zero bias (``hidden_view = "layer_norm"``).
    """

    hidden_view = "layer_norm"
    dtype = torch.float32  # the package's CPU strategies compute in float32 (or int8 weights)

    def __init__(self, path: Path, device: torch.device, family=None, ucfg=None, dtype=None):
        try:
            self.version = metadata.version("rwkv")
        except metadata.PackageNotFoundError:
            raise StatecastError("verifying a native RWKV .pth needs BlinkDL's rwkv package: pip install 'statecast[rwkv]'") from None
        # The package reads these at import time; they select its pure-PyTorch path.
        os.environ.setdefault("RWKV_JIT_ON", "0")
        os.environ["RWKV_CUDA_ON"] = "0"
        path = Path(path)
        if path.is_dir():  # --reference DIR: the one .pth in it
            from ..checkpoints.readers import weight_files

            path = next(iter(weight_files(path)), path)
        if path.suffix != ".pth":  # the package appends ".pth" to any other name
            raise StatecastError(f"{path}: BlinkDL's rwkv package reads a .pth file; expected a path ending in .pth")
        # The package calls torch.load without weights_only: the file is read first by
        # statecast's restricted reader (an unsafe pickle is refused here, never run), and the
        # package's own load runs with weights_only forced on (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD,
        # which would lift it, removed meanwhile).
        import pickle

        from ..checkpoints.readers import load_torch_pickle

        load_torch_pickle(path)
        with contextlib.redirect_stdout(io.StringIO()), self._weights_only_loads():
            from rwkv.model import RWKV

            try:
                self.model = RWKV(model=str(path), strategy=f"{device.type} fp32", verbose=False)
            except pickle.UnpicklingError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise StatecastError(f"refusing to load {path}: it is not a plain tensor checkpoint ({first})") from None
        self.implementation = "rwkv.model.RWKV"
        self.weights = f"RWKV(model={str(path)!r}, strategy='{device.type} fp32')"

    @staticmethod
    @contextlib.contextmanager
    def _weights_only_loads():
        """``torch.load`` calls made meanwhile are restricted to tensors whatever their caller
        asks: the variable that lifts the restriction is removed and the one that forces it set."""
        lift, force = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
        saved = {k: os.environ.get(k) for k in (lift, force)}
        os.environ.pop(lift, None)
        os.environ[force] = "1"
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _run(self, tokens: list[int], state=None):
        with contextlib.redirect_stdout(io.StringIO()):
            return self.model.forward(tokens, state, full_output=True)

    def logits(self, ids):
        return torch.stack([self._run(seq.tolist())[0].reshape(ids.shape[1], -1).float().cpu() for seq in ids])

    def hidden(self, ids):
        m, w = self.model, self.model.w
        n_layer, saved = m.args.n_layer, {k: w[k] for k in ("ln_out.weight", "ln_out.bias", "head.weight")}
        c = m.args.n_embd
        try:
            w["ln_out.weight"] = torch.ones_like(saved["ln_out.weight"])
            w["ln_out.bias"] = torch.zeros_like(saved["ln_out.bias"])
            w["head.weight"] = torch.eye(c, dtype=saved["head.weight"].dtype, device=saved["head.weight"].device)
            out = []
            for i in range(n_layer):
                m.args.n_layer = i + 1
                out.append(torch.stack([self._run(seq.tolist())[0].reshape(ids.shape[1], c).float().cpu() for seq in ids]))
            return out
        finally:
            m.args.n_layer = n_layer
            w.update(saved)

    def greedy(self, prompt, n):
        logits, state = self._run(prompt)
        new = []
        for _ in range(n):
            tok = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
            new.append(tok)
            logits, state = self._run([tok], state)
        return new



def build_hf_rwkv(out: Path, seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 320,
                        fmt: str = "safetensors", shard: str | None = None) -> Path:
    """A seeded ``RwkvForCausalLM`` saved in Hub format with a tokenizer."""
    from transformers import RwkvConfig, RwkvForCausalLM

    def make(vocab_size: int):
        return RwkvForCausalLM(RwkvConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                          intermediate_size=4 * hidden, context_length=256, bos_token_id=0, eos_token_id=0))

    # transformers' own RWKV init: its decays and mixes are what make an RWKV-4 model
    return seeded_checkpoint(out, make, seed=seed, vocab=vocab, fmt=fmt, shard=shard, spread=False)


FAMILY = Family(
    name="rwkv",
    model=("rwkv", "RwkvConfig", "Rwkv"),
    hf=(HfArch("rwkv", "RwkvForCausalLM", (HF,), config_from_hf, hf_config, reference_kwargs=(("rescale_every", 0),)),),
    native=NativeFormat(NATIVE, match=is_native, config=config_from_native, reference=RwkvPackageReference,
                        near_miss=native_near_miss, export_as="rwkv"),
    # RWKV-4: [B, C] token-shift inputs of the time mix and channel mix (model dtype), and the
    # WKV numerator, denominator and running log-scale [B, A] (float32)
    state={"att_x": StateField("att_shift"), "ffn_x": StateField("ffn_shift"), "att_num": StateField("wkv_num"),
           "att_den": StateField("wkv_den"), "att_max": StateField("wkv_max")},
    demo=Demo("demo-rwkv4", "RWKV-4 (RwkvForCausalLM)", build_hf_rwkv),
    keep_fp32=KEEP_FP32,
)
