"""Shared building blocks for the statecast architectures (pure PyTorch, no I/O).

Dimension letters used in the shape comments (each model file repeats the ones it uses):

    B  batch
    T  time (sequence length)
    C  d_model (residual stream width)
    Z  any trailing feature width (a norm's normalised dimension)
    F  d_ffn (MLP hidden width, "intermediate_size")
    X  experts of a mixture-of-experts layer; k of them chosen per token
    N  tokens, B * T, of a layer that treats them independently
    H  query heads
    Hkv  key/value heads (grouped-query attention: Hkv divides H)
    G  query heads per key/value head, H // Hkv
    D  head_dim
    P  past length (positions already in the KV state)
    S  key length, P + T

Only small, family-independent pieces live here; a family-specific block stays in
its own file.
"""

from __future__ import annotations

import contextlib
import math
import types
import typing
from dataclasses import MISSING, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConfigValueError(ValueError):
    """A unified config value of the wrong type or out of range: ``field``, ``value`` and
    what was ``expected`` (the caller names the file and its key)."""

    def __init__(self, cls_name: str, field: str, value: object, expected: str):
        super().__init__(f"{cls_name}.{field}: expected {expected}, got {value!r:.80}")
        self.field, self.value, self.expected = field, value, expected


MAX_INT = 2**31 - 1  # every dimension, count and length fits an int32 (ONNX, kernels)


def _type_ok(value: object, hint) -> bool:
    """``value`` (from JSON) matches the annotation ``hint``: int, float (ints too), bool,
    str, None, X | Y, list[X] / tuple[X, ...] (a list or tuple of X), dict."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple) or hint in (list, tuple):
        item = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else None
        return isinstance(value, (list, tuple)) and (item is None or all(_type_ok(v, item) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)  # bool, str


def _base(hint):
    """The annotation without ``| None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def _positive(name: str) -> bool:
    return name.endswith("eps") or name.endswith("theta")


def _expected(name: str, hint) -> str:
    """What a field accepts, in words."""
    base = _base(hint)
    none = " or null" if base is not hint else ""
    if base is int:
        return f"an integer in 1..{MAX_INT}{none}"
    if base is float:
        return f"a {'positive ' if _positive(name) else ''}finite number{none}"
    if base is bool:
        return "true or false"
    if base is str:
        return f"a string{none}"
    if typing.get_origin(base) in (list, tuple):
        return f"a list of {getattr(typing.get_args(base)[0], '__name__', 'value')}s"
    if base is dict or typing.get_origin(base) is dict:
        return f"an object of positive finite numbers (and a string *type){none}"
    return str(hint)


def _value_ok(name: str, value: object, hint) -> bool:
    """The type, then the range by naming convention: integers (dimensions, counts,
    lengths) in 1..MAX_INT, numbers finite and ``*eps`` / ``*theta`` > 0; in a dict field
    (rope_scaling) a ``*type`` key holds a string, every other key a finite number > 0."""
    if not _type_ok(value, hint):
        return False
    base = _base(hint)
    if value is None:
        return True
    if base is int:
        return 1 <= value <= MAX_INT
    if base is float:
        return math.isfinite(value) and (value > 0 or not _positive(name))
    if base is dict or typing.get_origin(base) is dict:
        return all(isinstance(v, str) if str(k).endswith("type") else type(v) in (int, float) and math.isfinite(v) and v > 0
                   for k, v in value.items())
    return True


# One letter per layer kind (``layer_kinds`` / ``ffn_kinds`` of a unified config), for a hybrid's
# layout line in ``convert inspect``: "M A M M A M" / "- E - E - E". A new kind adds its letter here.
KIND_LETTERS = {"mamba": "M", "attention": "A", "mlp": "-", "moe": "E", "hybrid": "H", "mamba2": "S"}


def config_from_unified(cls, cfg: dict, kind: str | None):
    """Build the frozen config dataclass ``cls`` from a unified config.

    Keys that are not fields (``family``, ...) are ignored and fields without a default are
    required. Every given value is checked against its field's annotation and range
    (:func:`_value_ok`) first: a bad one raises :class:`ConfigValueError` naming the field.
    For a one-kind model (``kind`` given), ``layer_kinds``, when present, must be
    ``[kind] * n_layer``; a hybrid (``kind=None``) has ``layer_kinds`` as a field.
    """
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in cfg]
    if missing:
        raise ValueError(f"unified {cls.__name__} lacks {missing}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for name in sorted(names & set(cfg), key=list(cfg).index):
        if not _value_ok(name, cfg[name], hints[name]):
            raise ConfigValueError(cls.__name__, name, cfg[name], _expected(name, hints[name]))
    out = cls(**{k: v for k, v in cfg.items() if k in names})
    kinds = cfg.get("layer_kinds")
    if kind is not None and kinds is not None and list(kinds) != [kind] * out.n_layer:
        raise ValueError(f"{cls.__name__}: layer_kinds must be [{kind!r}] * {out.n_layer}, got {kinds!r}")
    return out


def every_layer(fields: tuple[str, ...], n_layer: int) -> dict[str, tuple[int, ...]]:
    """``state_layers()`` of a model whose every layer carries every state field: the model
    layer index of each row of each stacked field (export names per-layer tensors by it)."""
    return {name: tuple(range(n_layer)) for name in fields}


class LayerStack(tuple):
    """A stacked state field [L, ...] held as its L per-layer tensors, for exported graphs.

    A graph's state crosses its boundary as one tensor per layer; stacking them inside the
    graph and slicing the stack again would copy every layer's KV history twice per step
    (onnxruntime has no views). Models only index rows (``stack[i]``) and read ``shape``,
    so inside an export this tuple stands in for the stack. Not for empty fields."""

    @property
    def shape(self) -> tuple:
        return (len(self), *self[0].shape)


def stack_layers(per_layer: list[Tensor]) -> Tensor:
    """A model's new state field from its per-layer tensors: ``torch.stack`` eagerly, a
    :class:`LayerStack` (no copy) while exporting."""
    return LayerStack(per_layer) if is_exporting() else torch.stack(per_layer)


def token_shift(x: Tensor, last: Tensor) -> Tensor:
    """The previous position's input at every position: ``out[:, t] = x[:, t-1]``,
    ``out[:, 0] = last``.

    RWKV's "time shift" (``nn.ZeroPad2d((0, 0, 1, -1))`` in transformers'
    ``modeling_rwkv``, ``torch.cat((sx.unsqueeze(0), xx[:-1,:]))`` in BlinkDL's
    ``rwkv`` package), generalised to carry the last position of the previous call
    (``last``) instead of zeros, so that a sequence split into pieces gives the
    same result as one call.  Also the causal-conv building block (Mamba keeps
    ``d_conv - 1`` positions; this is the one-position case).

    x:    [B, T, C]
    last: [B, C]    x[:, -1] of the previous piece (zeros at the start of a sequence)
    ->    [B, T, C]
    """
    if x.shape[1] == 1:
        return last.unsqueeze(1).to(x.dtype)  # [B, 1, C] view, no copy
    return torch.cat([last.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Root-mean-square norm over the last dimension, computed in float32.

    Llama's ``LlamaRMSNorm`` (Zhang & Sennrich 2019, "Root Mean Square Layer
    Normalization"): ``x / sqrt(mean(x^2) + eps)`` in float32, cast back to the input
    dtype, then scaled by ``weight`` (Mamba's ``MambaRMSNorm`` and Jamba's
    ``JambaRMSNorm`` are the same function). ``weight=None`` is Falcon Mamba's
    ``rms_forward`` on dt/B/C, which has no learned scale.

    x: [..., Z]; weight: [Z] or None -> [..., Z] in x's dtype
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(x.dtype)
    return h if weight is None else weight * h


class RMSNorm(nn.Module):
    """:func:`rms_norm` with a learned scale (``weight`` initialised to ones)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        if not self.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


# --------------------------------------------------------------------------- norms, MLPs

NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """``"layernorm"`` -> ``nn.LayerNorm`` (weight and bias; GPT-2's ``ln_1``/``ln_2``/``ln_f``),
    ``"rmsnorm"`` -> :class:`RMSNorm` (weight only; ``LlamaRMSNorm``)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


def _gelu_tanh(x: Tensor, inplace: bool = False) -> Tensor:
    return torch.ops.aten.gelu_(x, approximate="tanh") if inplace else F.gelu(x, approximate="tanh")


def _gelu(x: Tensor, inplace: bool = False) -> Tensor:
    return torch.ops.aten.gelu_(x) if inplace else F.gelu(x)


# Activation by the name transformers' ACT2FN uses; each entry is f(x, inplace) -> Tensor.
# "gelu_new" (GPT-2's ``NewGELUActivation``) is written out in transformers as
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): the same function as
# ``F.gelu(approximate="tanh")`` ("gelu_pytorch_tanh", ``GELUTanh``), which computes it in one
# kernel. Deviation: we use the kernel for both. The results differ by float rounding only
# (max 4.8e-7 over [-10, 10] in float32, one ulp of the largest outputs), and the op takes
# 5.3 ms instead of 18.3 ms on a [1024, 3072] GPT-2-small activation (1 thread): ~150 ms
# of a 1024-token prefill.
ACTIVATIONS = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": _gelu,  # exact (erf) GELU, ``GELUActivation``
    "silu": lambda x, inplace=False: F.silu(x, inplace=inplace),  # SwiGLU's gate (Llama)
    "relu": lambda x, inplace=False: F.relu(x, inplace=inplace),
}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def is_exporting() -> bool:
    """Inside ``torch.jit.trace`` (``torch.onnx.export``'s TorchScript path) or dynamo /
    ``torch.export``: take the one functional path that serves every shape."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _inplace_ok(t: Tensor) -> bool:
    """Whether an elementwise op may overwrite ``t``, a fresh intermediate: not when autograd
    may need it, nor while exporting. In place saves a new [B, T, F] buffer, whose page
    faults cost as much as the op itself at T=1024 (see ``rwkv.ChannelMix``)."""
    return not (t.requires_grad or is_exporting())


def embedding(n: int, C: int) -> nn.Embedding:
    """An [n, C] ``nn.Embedding`` left uninitialised: the model's ``reset_parameters`` (or a
    loaded state dict) fills it, and nn.Embedding's own ``normal_()`` on the meta device
    imports torch._dynamo (~1 s per conversion)."""
    return nn.Embedding(n, C, _weight=torch.empty(n, C))


class CausalLM(nn.Module):
    """What every statecast model shares around its blocks: the token embedding ``embed``,
    the head (``lm_head``, or the embedding itself when ``lm_head`` is None: tied) and the
    one-token ``step``. Subclasses define ``forward(input_ids, state) -> (logits, state)``."""

    embed: nn.Embedding
    lm_head: nn.Linear | None

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """input_ids [B, T] -> embeddings [B, T, C].

        Exporting a tied model, the rows are read from the head's transposed table [C, V]
        instead: the exporter folds the head's transpose into a constant, and a lookup in
        the [V, C] table would keep a second copy of the largest tensor in the graph."""
        if self.lm_head is None and is_exporting():
            rows = self.embed.weight.t().index_select(1, input_ids.reshape(-1))  # [C, B*T]
            return rows.t().reshape(*input_ids.shape, -1)
        return self.embed(input_ids)

    def head_logits(self, x: Tensor) -> Tensor:
        """x [B, T, C] after the final norm -> logits [B, T, V] (in the head's dtype)."""
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight  # [V, C]
        return torch.matmul(x.to(head.dtype), head.t())

    def step(self, input_ids: Tensor, state=None):
        """One token: input_ids [B] -> logits [B, V] (or [B, 1] -> [B, 1, V]), new state."""
        logits, state = self.forward(input_ids.reshape(-1, 1), state)
        return (logits[:, 0] if input_ids.dim() == 1 else logits), state

    @contextlib.contextmanager
    def parallel_as_step(self):
        """A context in which the whole-sequence path computes what the one-token step does.

        Where the reference's own two paths compute different functions (transformers'
        Mamba-2 clamps dt on its chunked path and not in its cached step), statecast mirrors
        each, and a self-consistency check (verify's steps vs parallel, the ONNX step graph
        vs PyTorch) must compare the step with the whole-sequence path under the step's rule.
        Every submodule with a ``step_rule`` (a description, or None when its paths agree)
        switches its whole-sequence path to that rule (``parallel_as_step = True``) inside.
        Yields the descriptions (empty: nothing differs), for the report."""
        modules = [m for m in self.modules() if getattr(m, "step_rule", None)]
        for m in modules:
            m.parallel_as_step = True
        try:
            yield sorted({m.step_rule for m in modules})
        finally:
            for m in modules:
                m.parallel_as_step = False


def per_head_linear(x: Tensor, weight: Tensor) -> Tensor:
    """One independent linear map per head, no bias: x [B, T, H, I], weight [H, O, I] -> [B, T, H, O]
    (as one batched MatMul over the heads, which exports as a plain MatMul)."""
    return torch.matmul(x.transpose(1, 2), weight.transpose(1, 2)).transpose(1, 2)


class HeadLinear(nn.Module):
    """H independent ``nn.Linear(I, O)`` maps, one per head, held as ``weight`` [H, O, I] and
    ``bias`` [H, O] (or None): the per-head ``x_proj`` / ``dt_proj`` of Zamba's multi-head Mamba
    mixer (``ZambaMambaMixer.x_proj_weight`` / ``dt_proj_weight`` / ``dt_proj_bias``).
    x [B, T, H, I] -> [B, T, H, O]."""

    def __init__(self, n_heads: int, d_in: int, d_out: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_heads, d_out, d_in))
        self.bias = nn.Parameter(torch.empty(n_heads, d_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = per_head_linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class MLP(nn.Module):
    """``down(act(up(x)))``: GPT-2's ``GPT2MLP`` (``c_fc`` = up, ``c_proj`` = down, with biases)."""

    def __init__(self, d_model: int, d_ffn: int, act: str, bias: bool = False):
        super().__init__()
        self.act_name = act
        self.act = _activation(act)
        self.up = nn.Linear(d_model, d_ffn, bias=bias)
        self.down = nn.Linear(d_ffn, d_model, bias=bias)

    def extra_repr(self) -> str:
        return f"act={self.act_name}"

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)  # [B, T, F]
        return self.down(self.act(h, _inplace_ok(h)))  # [B, T, C]


class LoRA(nn.Module):
    """A low-rank adapter ``up(down(x))`` (Hu et al. 2021, "LoRA"), added to a projection's
    output by the module that uses it: Zamba2's per-use adapters on its shared blocks'
    q/k/v and gate|up projections (``nn.Sequential(Linear(in, r), Linear(r, out))``, no bias).
    x [..., I] -> [..., O]; ``down.weight`` [r, I], ``up.weight`` [O, r]."""

    def __init__(self, d_in: int, rank: int, d_out: int):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: Llama's ``LlamaMLP`` (SwiGLU with act="silu";
    Shazeer 2020, "GLU Variants Improve Transformer"); also Mistral, Qwen2 and Jamba."""

    def __init__(self, d_model: int, d_ffn: int, act: str, bias: bool = False):
        super().__init__()
        self.act_name = act
        self.act = _activation(act)
        self.gate = nn.Linear(d_model, d_ffn, bias=bias)
        self.up = nn.Linear(d_model, d_ffn, bias=bias)
        self.down = nn.Linear(d_ffn, d_model, bias=bias)

    def extra_repr(self) -> str:
        return f"act={self.act_name}"

    def forward(self, x: Tensor, adapter: "LoRA | None" = None) -> Tensor:
        """x [B, T, C] -> [B, T, C]. ``adapter``: a :class:`LoRA` [C -> 2F] whose output rows
        [gate | up] are added to gate(x) and up(x) (Zamba2's ``gate_up_proj_adapter_list``
        entry of one use of a shared MLP)."""
        g = self.gate(x)  # [B, T, F]
        u = self.up(x)  # [B, T, F]
        if adapter is not None:
            d = adapter(x)  # [B, T, 2F]
            F_ = g.shape[-1]
            g, u = g + d[..., :F_], u + d[..., F_:]
        if _inplace_ok(g):
            return self.down(self.act(g, True).mul_(u))
        return self.down(self.act(g) * u)  # [B, T, C]


class MoE(nn.Module):
    """Top-k routed mixture of gated-MLP experts, full capacity (no token is dropped).

    Mirrors transformers' ``JambaSparseMoeBlock`` (``JambaTopKRouter`` + ``MixtralExperts``;
    Shazeer et al. 2017, "Outrageously Large Neural Networks"; Jiang et al. 2024, Mixtral):
    router logits ``x W_r^T``, softmax in float32 over the X experts, the top-k
    probabilities and their experts; each chosen expert's ``down(act(gate x) * up x)``
    times its probability (cast to the model dtype), summed. Jamba keeps the top-k
    probabilities as they are; ``normalize=True`` renormalises them to sum to 1 (Mixtral).

    Expert weights are stacked: ``gate``/``up`` [X, F, C], ``down`` [X, C, F] (the
    converter stacks Jamba's per-expert ``experts.{j}.*_proj.weight``). Two evaluation
    orders of the same sum:
      * grouped (eager): per chosen expert, its tokens gathered, three matmuls on that
        expert's weight views, scaled, ``index_add_`` back (transformers' loop; a decode
        step touches only the k chosen experts' weights);
      * gathered (``is_exporting``: ``torch.compile``, tracing): each token's k expert
        matrices gathered by index and applied with batched matmuls; no data-dependent
        control flow, so one graph serves every routing (it copies k expert matrices per token).
    The ONNX exporter swaps each layer for its own traced form (``export.onnx_moe``).
    """

    def __init__(self, d_model: int, d_ffn: int, n_experts: int, top_k: int, act: str = "silu", normalize: bool = False):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in 1..n_experts ({n_experts}), got {top_k}")
        X, F_, C = n_experts, d_ffn, d_model
        self.n_experts, self.top_k, self.normalize = n_experts, top_k, normalize
        self.act_name = act
        self.act = _activation(act)
        self.router = nn.Linear(C, X, bias=False)  # weight [X, C]
        self.gate = nn.Parameter(torch.empty(X, F_, C))
        self.up = nn.Parameter(torch.empty(X, F_, C))
        self.down = nn.Parameter(torch.empty(X, C, F_))

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, top_k={self.top_k}, act={self.act_name}, normalize={self.normalize}"

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, C] -> weights [N, k] (x's dtype), expert indices [N, k]."""
        weights, index = top_k_route(self.router(x), self.top_k, self.normalize)
        return weights.to(x.dtype), index

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # [N, C]
        weights, index = self.route(flat)
        if is_exporting():
            out = self._gathered(flat, weights, index)
        else:
            out = self._grouped(flat, weights, index)
        return out.view(B, T, C)

    def _grouped(self, x: Tensor, weights: Tensor, index: Tensor) -> Tensor:
        out = torch.zeros_like(x)  # [N, C]
        for e in torch.unique(index).tolist():  # ascending, as transformers' loop
            token, slot = torch.where(index == e)  # [n] each
            h = x[token]  # [n, C]
            g = F.linear(h, self.gate[e])  # [n, F]
            y = F.linear(self.act(g) * F.linear(h, self.up[e]), self.down[e])  # [n, C]
            out.index_add_(0, token, y * weights[token, slot, None])
        return out

    def _gathered(self, x: Tensor, weights: Tensor, index: Tensor) -> Tensor:
        return gathered_experts(x, weights, index, self.gate, self.up, self.down, self.act)


def top_k_route(logits: Tensor, k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """Router logits [N, X] -> float32 weights [N, k] (softmax over X in float32, the top k,
    renormalised to sum 1 when ``normalize``), expert indices [N, k]."""
    weights, index = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float32), k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, index


def gathered_experts(x: Tensor, weights: Tensor, index: Tensor, gate: Tensor, up: Tensor, down: Tensor, act) -> Tensor:
    """x [N, C], weights [N, k] (x's dtype), index [N, k] -> sum_k weight * down(act(gate x) * up x) [N, C],
    each token's k expert matrices gathered from gate/up [X, F, C] and down [X, C, F]."""
    h = x[:, None, :, None]  # [N, 1, C, 1]
    g = torch.matmul(gate[index], h).squeeze(-1)  # [N, k, F, C] @ [N, 1, C, 1] -> [N, k, F]
    u = torch.matmul(up[index], h).squeeze(-1)  # [N, k, F]
    y = torch.matmul(down[index], (act(g) * u).unsqueeze(-1)).squeeze(-1)  # [N, k, C]
    return (y * weights.unsqueeze(-1)).sum(1)  # [N, C]


# --------------------------------------------------------------------------- rotary positions


ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> Tensor:
    """Inverse frequencies [D/2] (float32, on the CPU) of rotary position embeddings.

    Mirrors transformers' ``modeling_rope_utils``: ``LlamaRotaryEmbedding.compute_default_rope_parameters``
    (Su et al. 2021, "RoFormer": theta^(-2i/D)), ``_compute_linear_scaling_rope_parameters``
    (``{"rope_type": "linear", "factor"}``: frequencies / factor, i.e. positions / factor) and
    ``_compute_llama3_parameters`` (``{"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}``: wavelengths longer than
    original/low_freq_factor are stretched by ``factor``, shorter than original/high_freq_factor
    kept, and the band between interpolated smoothly). Same float32 operations in the same
    order, so the frequencies are bit-identical. All three have attention_factor 1 (cos and
    sin are not rescaled). ``device="cpu"`` explicitly: a model built under
    ``torch.device("meta")`` still gets real frequencies.
    """
    kind = "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported; expected one of {ROPE_TYPES}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class Rope:
    """Rotary position embedding tables (``LlamaRotaryEmbedding``), not an ``nn.Module``:
    it has no parameters, and a module buffer would be left on the meta device by
    ``Family.build(..., "meta")`` + ``load_state_dict(assign=True)``."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)  # [D/2] float32, CPU
        self._on_device = {self.inv_freq.device: self.inv_freq}  # no host->device copy per call

    def cos_sin(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """positions [T] or [B, T] (integers) -> cos, sin [T, D] or [B, T, D] in ``dtype``.

        ``LlamaRotaryEmbedding.forward``: angles in float32, ``cat((freqs, freqs))`` (the
        rotate_half layout: dimension i and i + D/2 share a frequency), cast to the model dtype.
        """
        inv_freq = self._on_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._on_device[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq  # [..., T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [..., T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension (transformers' ``rotate_half``)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` (``apply_rotary_pos_emb``, one tensor at a time).

    x: [..., D] queries or keys; cos, sin broadcastable to x (e.g. [T, 1, D] for x [B, T, H, D]).
    """
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------- attention


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * n_rep, S, D], each kv head repeated for its n_rep query
    heads (query head h reads kv head h // n_rep), transformers' ``repeat_kv``."""
    if n_rep == 1:
        return x
    B, Hkv, S, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)


_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa= exists


def attention_bias(
    q_len: int, past_len: int, sliding_window: int | None, dtype: torch.dtype, device=None
) -> Tensor | None:
    """Additive attention mask [T, S] (0 = attend, -inf = masked) for queries at absolute
    positions P..P+T-1 over keys 0..P+T-1, or None where SDPA's ``is_causal`` gives the same.

    Key j is visible from query i iff ``j <= i`` and, with a sliding window W, ``j > i - W``
    (transformers' ``causal_mask_function`` and ``sliding_window_overlay``: the query itself
    and the W - 1 keys before it). The past length P comes from tensor shapes, so the mask
    traces with a dynamic P (P = 0 included).

    None (``is_causal``, top-left aligned) only for an empty past with no window in reach,
    outside tracing/export: SDPA's causal kernel skips the masked blocks, ~1.5x faster than
    any explicit mask at T=1024 (16 ms vs 24 ms per GPT-2-small layer, 2 threads). Exported
    graphs always take the mask, one path for every T and P.
    """
    if not is_exporting() and past_len == 0 and (sliding_window is None or q_len <= sliding_window):
        return None
    q_pos = torch.arange(q_len, device=device) + past_len  # [T] absolute query positions
    k_pos = torch.arange(past_len + q_len, device=device)  # [S]
    dist = q_pos[:, None] - k_pos[None, :]  # [T, S] how far back each key is
    visible = dist >= 0
    if sliding_window is not None:
        visible = visible & (dist < sliding_window)
    # float, not bool: SDPA turns a bool mask into a float one on every call (31 vs 24 ms above)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads, optional rotary positions,
    optional sliding window, and the KV history as explicit inputs and outputs.

    Mirrors ``LlamaAttention`` (+ ``sdpa_attention_forward``; Mistral's sliding window,
    Qwen2's q/k/v biases) and ``GPT2Attention`` (c_attn split into q/k/v, biases everywhere,
    no rotary). With ``rope=None`` and no learned positions it is Jamba's attention (NoPE).
    ``d_in`` (default ``d_model``) is the width q/k/v read, when it is not the width o writes:
    Zamba's shared attention reads the residual stream concatenated with the embeddings (2C)
    and writes C (``ZambaAttention``).
    Softmax(q k^T * scale + mask) v via ``F.scaled_dot_product_attention``, which exports to
    ONNX (opset >= 14) and, on CPU, runs a flash kernel instead of materialising [T, S] scores.

    Deviation in grouped-query form (same products): under an explicit mask the H query heads
    are regrouped as [B, Hkv, G*T, D] against the Hkv kv heads (the mask repeated G times), so
    the KV history is never copied H/Hkv-fold; this is transformers' ``pack_gqa`` (which it
    applies to masked T = 1 steps) for any T. The ``is_causal`` path uses SDPA's
    ``enable_gqa`` as transformers does there (``repeat_kv`` on torch < 2.5).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int,
        head_dim: int,
        qkv_bias: bool = False,
        o_bias: bool = False,
        sliding_window: int | None = None,
        scale: float | None = None,
        d_in: int | None = None,
    ):
        super().__init__()
        if n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.sliding_window = sliding_window
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        d_in = d_model if d_in is None else d_in  # q/k/v read d_in features, o writes d_model
        self.q = nn.Linear(d_in, n_head * head_dim, bias=qkv_bias)
        self.k = nn.Linear(d_in, n_kv_head * head_dim, bias=qkv_bias)
        self.v = nn.Linear(d_in, n_kv_head * head_dim, bias=qkv_bias)
        self.o = nn.Linear(n_head * head_dim, d_model, bias=o_bias)

    def forward(
        self,
        x: Tensor,
        past_key: Tensor,
        past_value: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        kv_out: tuple[Tensor, Tensor] | None = None,
        adapters: dict[str, LoRA] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, d_in]; past_key, past_value [B, Hkv, P, D]; rope: (cos, sin) [T, D] or
        [B, T, D] for the T new positions (None: no rotary positions); mask: the
        :func:`attention_bias` of these shapes, if the caller shares one across layers
        (None: built here); kv_out: two fresh contiguous [B, Hkv, P+T, D] tensors (e.g. one
        layer's slice of a stacked state) to write key and value into, saving the caller a
        stacking copy. Eager no-grad use only: ``out=`` has no autograd and does not export.
        adapters: :class:`LoRA` deltas by projection ("q", "k", "v"), added to those projections
        of x (one use of Zamba2's shared attention).
        -> out [B, T, C], key and value [B, Hkv, P+T, D] (past + new; the past is not trimmed
        to the sliding window: the mask hides what lies outside it)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        G = H // Hkv
        P = past_key.shape[2]
        q, k, v = self.q(x), self.k(x), self.v(x)
        if adapters:
            q, k, v = (t + adapters[n](x) if n in adapters else t for n, t in (("q", q), ("k", k), ("v", v)))
        q = q.view(B, T, H, D)
        k = k.view(B, T, Hkv, D)
        v = v.view(B, T, Hkv, D)
        if rope is not None:
            cos, sin = (t.unsqueeze(-2) for t in rope)  # [(B,) T, 1, D]: broadcast over heads
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_out is None:
            key = torch.cat([past_key, k.transpose(1, 2)], dim=2)  # [B, Hkv, S, D]
            value = torch.cat([past_value, v.transpose(1, 2)], dim=2)
        else:
            key = torch.cat([past_key, k.transpose(1, 2)], dim=2, out=kv_out[0])
            value = torch.cat([past_value, v.transpose(1, 2)], dim=2, out=kv_out[1])
        if mask is None:
            mask = attention_bias(T, P, self.sliding_window, q.dtype, x.device)
        if mask is None:  # empty past, no window in reach: the causal kernel
            qt = q.transpose(1, 2)  # [B, H, T, D]
            if _SDPA_GQA:  # what transformers' sdpa path does here (no mask, CPU): no kv copy
                out = F.scaled_dot_product_attention(qt, key, value, is_causal=True, scale=self.scale, enable_gqa=G > 1)
            else:
                out = F.scaled_dot_product_attention(
                    qt, repeat_kv(key, G), repeat_kv(value, G), is_causal=True, scale=self.scale
                )  # [B, H, T, D]
        else:
            # queries regrouped by kv head: [B, T, Hkv, G, D] -> [B, Hkv, G*T, D] (a view for T = 1)
            qg = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
            out = F.scaled_dot_product_attention(
                qg, key, value, attn_mask=mask.repeat(G, 1) if G > 1 else mask, scale=self.scale
            )  # [B, Hkv, G*T, D]
            out = out.reshape(B, H, T, D)  # [B, Hkv, G, T, D] -> query head h = kv * G + g
        return self.o(out.transpose(1, 2).reshape(B, T, H * D)), key, value
