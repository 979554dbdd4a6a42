"""``convert export --format onnx``: a recurrent-mode graph with the state as explicit inputs and outputs.

The exporter traces the same ``statecast.arch`` model that ``verify`` checks, through a thin
wrapper (:class:`StateIO`) that turns per-layer graph inputs into the model's stacked state
NamedTuple, calls the model's own forward, and splits the new state into per-layer outputs:

    input_ids [B, T] int64, past_key_values.{i}.{suffix} ...  ->  logits [B, T, V], present.{i}.{suffix} ...

``{i}`` is the model's layer index (``model.state_layers()`` maps every row of a stacked
state field to its layer) and ``{suffix}`` comes from the family record's ``state`` (onnxruntime-genai's
``key``/``value`` and ``conv_state``/``recurrent_state``; RWKV's five tensors have their own).
Batch is dynamic everywhere; T is dynamic for the families whose record says ``onnx_dynamic_length``
and 1 otherwise; a KV state's length (past / total sequence length) is dynamic, starting at 0.

Output directory (written atomically: a temporary sibling renamed into place only after the
parity check passed)::

    model.onnx [+ model.onnx.data]   the graph; weights past ``external_data_bytes`` (2 GiB) external
    statecast.json                   format statecast-onnx/1: inputs, outputs, state (dtype, shape, initial fill)
    genai_config.json                onnxruntime-genai's config, where it can describe the model (KV-only state)
    parity.json                      onnxruntime vs the PyTorch model on a fixed sequence
    tokenizer.json ...               copied from the model

dtypes: ``fp32``; ``fp16`` traces the model cast to float16 (``load_model(dtype="float16")``, so
what the model keeps in float32 stays float32 in the graph: RWKV's decay/bonus and its WKV
exp/state arithmetic, Mamba's SSM state); ``int8`` is onnxruntime's dynamic quantization
(int8 weights per output channel, uint8 activations quantized at run time) of the fp32 graph's
MatMuls and constant-table Gathers. Every dtype is judged against the float32 PyTorch model by :data:`THRESHOLDS`.

A mixture of experts (Jamba's ``layers.MoE``) is one node per layer in the traced graph:
before tracing, :func:`.onnx_moe.swap_moe` puts a ``TracedMoE`` in its place, by ``moe_op``:
standard ops (:mod:`.onnx_moe` rewrites the node into one ``If`` per expert) or
onnxruntime's contrib ``MoE`` op.
"""

from __future__ import annotations

import json
import platform
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import Tensor, nn

from .. import __version__
from ..arch.layers import LayerStack
from ..checkpoints.atomic import atomic_directory
from ..checkpoints.layout import open_unified
from ..checkpoints.readers import dtype_name
from ..convert.generate import generate_ids
from ..convert.loading import load_model
from ..errors import ParityFailed, StatecastError
from ..families import FAMILIES
from ..families.record import StateField
from ..parity.metrics import (
    GREEDY_PROMPT,
    GREEDY_TOKENS,
    PARITY_SEED,
    compare_logits,
    failed,
    json_metric,
    judge,
    random_ids,
    show,
)
from ..runtime.ort import BATCH, DESCRIPTION, FORMAT, PAST, SEQUENCE, TOTAL, OnnxModel, provider_name
from .onnx_moe import DOMAIN as MOE_DOMAIN
from .onnx_moe import TracedMoE, expand_moe, swap_moe

ONNX_DTYPES = ("fp32", "fp16", "int8")
# the dtype of the PyTorch model traced for each export dtype (int8 quantizes the fp32 graph)
TRACE_DTYPE = {"fp32": "float32", "fp16": "float16", "int8": "float32"}
OPSET = 17  # LayerNormalization needs 17; scaled_dot_product_attention exports from 14
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit: larger graphs keep their weights in model.onnx.data
GRAPH_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
GENAI_FILE, PARITY_FILE = "genai_config.json", "parity.json"
# how a mixture of experts is written (onnx_moe.swap_moe): "standard" ONNX ops that any runtime runs
# (onnx_moe: one If per expert, reading only the chosen experts' matrices), or onnxruntime's
# contrib MoE op (its CPU kernel is the slower one for one-token decode: see the README)
MOE_OPS = ("standard", "com.microsoft")
QUANTIZATION = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "per_channel": True,
                # Gather: lookups in constant tables (the embedding; the one [C, V] table of a
                # tied model, shared with the head's MatMul)
                "op_types": ["MatMul", "Gemm", "Gather"],
                # MatMuls kept in float, by node-name fragment (the exporter names nodes by module
                # path): MoE routers, where a flipped expert choice replaces a token's whole MLP
                # output (the experts' MatMuls, in their If branches, are quantized)
                "keep_float": ["/router/"]}


# Parity bounds by export dtype, against the float32 PyTorch model (metrics and judging:
# parity/metrics.py; None = recorded, not judged). fp32 is judged relative to the logits'
# spread, never by an absolute bound: a full-size default-init Mamba (24 x 768, vocab 50280),
# exported correctly, differs from PyTorch by max_abs_diff 7.6e-3 at logit_scale 2.8
# (rel_max_abs_diff 2.7e-3), nmse -70.9 dB, kl_mean 3.0e-7, top-1 1.0 (transformers' own
# export of such a checkpoint by 9e-3); the bounds leave 4x to 30x room. fp16 and int8 change every logit a little, so
# they are judged on the distribution (KL) and the argmax; int8's bounds catch a broken
# quantization (KL of nats, argmax near chance), not a quality target: the parity input is
# random tokens, whose next-token distributions are flat, so the argmax flips easily.
THRESHOLDS: dict[str, dict[str, float | None]] = {
    "fp32": {"rel_max_abs_diff": 1e-2, "nmse_db": -60.0, "top1_agreement": 0.999, "kl_mean": 1e-5},
    "fp16": {"rel_max_abs_diff": None, "top1_agreement": 0.97, "kl_mean": 5e-3},
    "int8": {"rel_max_abs_diff": None, "top1_agreement": 0.80, "kl_mean": 5e-2},
}
PARITY_CHUNKS = (20, 1, 27, 16)  # chunked prefill (dynamic-T graphs): an empty past, then P > 0, T = 1 inside


# --------------------------------------------------------------------------- graph I/O


@dataclass(frozen=True)
class Slot:
    """One per-layer state tensor: row ``row`` of the stacked field ``field``, layer ``layer``."""

    field: str
    row: int
    layer: int

    spec: StateField  # its graph names (the family record's ``state``)

    @property
    def input(self) -> str:
        return f"past_key_values.{self.layer}.{self.spec.suffix}"

    @property
    def output(self) -> str:
        return f"present.{self.layer}.{self.spec.suffix}"


def state_slots(model: nn.Module, names: dict[str, StateField]) -> list[Slot]:
    """Every per-layer state tensor of ``model``, ordered by layer, then by state field;
    ``names``: the graph names of the state fields (the family record's ``state``)."""
    fields = type(model.init_state(1))._fields
    unknown = [f for f in fields if f not in names]
    if unknown:
        raise StatecastError(f"no ONNX names for state fields {unknown} of {type(model).__name__}")
    layers = model.state_layers()
    slots = [Slot(f, row, layer, names[f]) for f in fields for row, layer in enumerate(layers[f])]
    return sorted(slots, key=lambda s: (s.layer, fields.index(s.field)))


class StateIO(nn.Module):
    """The graph's calling convention around an unchanged model: ``forward(input_ids, *past)``
    with one tensor per :class:`Slot` -> ``(logits, *present)`` in the same order."""

    def __init__(self, model: nn.Module, slots: list[Slot]):
        super().__init__()
        self.model, self.slots = model, slots
        self.state_type = type(model.init_state(1))

    def forward(self, input_ids: Tensor, *past: Tensor):
        # input_ids [B, T]; past: per-layer tensors [B, ...] in slot order
        rows: dict[str, dict[int, Tensor]] = {f: {} for f in self.state_type._fields}
        for slot, t in zip(self.slots, past):
            rows[slot.field][slot.row] = t
        empty = None
        stacked = []
        for f in self.state_type._fields:
            if rows[f]:
                stacked.append(LayerStack(rows[f][r] for r in range(len(rows[f]))))  # [L_f, B, ...] as rows, no copy
            else:  # a field no layer has: the model's own empty stack
                empty = empty or self.model.init_state(input_ids.shape[0], input_ids.device)
                stacked.append(getattr(empty, f))
        logits, new = self.model(input_ids, self.state_type(*stacked))  # [B, T, V], stacked new state
        return (logits, *(getattr(new, s.field)[s.row] for s in self.slots))


def _dynamic_axes(slots: list[Slot], dynamic_length: bool) -> dict[str, dict[int, str]]:
    tokens = {0: BATCH, 1: SEQUENCE} if dynamic_length else {0: BATCH}
    axes = {"input_ids": tokens, "logits": dict(tokens)}
    for s in slots:
        grow = s.spec.length_axis
        axes[s.input] = {0: BATCH, **({grow: PAST} if grow is not None else {})}
        axes[s.output] = {0: BATCH, **({grow: TOTAL} if grow is not None else {})}
    return axes


@torch.no_grad()
def trace_graph(model: nn.Module, slots: list[Slot], dynamic_length: bool, vocab: int, path: Path) -> None:
    """``torch.onnx.export`` (TorchScript tracing: dynamic axes are plain shape arithmetic
    there) of ``StateIO(model)`` to ``path``. The example has B = 2, a past of 5 tokens and
    T = 3 (or 1), so that no size is 0 or 1 by accident and then baked in."""
    gen = torch.Generator().manual_seed(0)
    _, state = model(torch.randint(0, vocab, (2, 5), generator=gen))  # a non-empty past
    ids = torch.randint(0, vocab, (2, 3 if dynamic_length else 1), generator=gen)
    past = [getattr(state, s.field)[s.row].contiguous() for s in slots]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values, the legacy exporter's notice
        torch.onnx.export(
            StateIO(model, slots).eval(), (ids, *past), str(path), input_names=["input_ids"] + [s.input for s in slots],
            output_names=["logits"] + [s.output for s in slots], dynamic_axes=_dynamic_axes(slots, dynamic_length),
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    traced = onnx.load(str(path), load_external_data=False)  # (a graph over 2 GiB has its weights beside it)
    if any(node.domain == MOE_DOMAIN for node in traced.graph.node):  # --moe-op standard: into standard ops
        onnx.load_external_data_for_model(traced, str(path.parent))
        expand_moe(traced)
        onnx.save_model(traced, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic quantization of every MatMul/Gemm with constant weights (:data:`QUANTIZATION`)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node
            if any(fragment in n.name for fragment in QUANTIZATION["keep_float"])]
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # its advice to run pre-processing first, per call
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=QUANTIZATION["per_channel"],
                         op_types_to_quantize=QUANTIZATION["op_types"], nodes_to_exclude=keep,
                         use_external_data_format=True, extra_options={"EnableSubgraph": True})
    finally:
        logger.setLevel(level)


def save_graph(src: Path, out_dir: Path, external_data_bytes: int) -> str | None:
    """Load the graph at ``src`` (with any external data next to it) and write it as
    ``out_dir/model.onnx``, its weights in ``model.onnx.data`` when they total more than
    ``external_data_bytes``. Returns the external data file name, or None."""
    graph = onnx.load(str(src))
    weight_bytes = sum(t.ByteSize() for t in graph.graph.initializer)  # serialized: what counts against 2 GiB
    external = weight_bytes > external_data_bytes
    onnx.save_model(graph, str(out_dir / GRAPH_FILE), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=0)
    onnx.checker.check_model(str(out_dir / GRAPH_FILE))  # by path: works past 2 GiB
    return DATA_FILE if external else None


# --------------------------------------------------------------------------- description


def _value_info(v) -> dict:
    t = v.type.tensor_type
    dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
    return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}


def _fill_value(t: Tensor) -> float:
    """The one value an initial state tensor holds (0.0 for an empty one)."""
    if t.numel() == 0:
        return 0.0
    first = t.flatten()[0]
    if not bool((t == first).all()):
        raise StatecastError("the model's initial state is not a constant fill; it cannot be described in statecast.json")
    return float(str(first.float().numpy()))  # the shortest decimal of the float32 value: -1e+38, not -9.9999997e+37


def describe(model: nn.Module, um, slots: list[Slot], dtype: str, dynamic_length: bool, graph_dir: Path,
             external: str | None, tokenizer: list[str]) -> dict:
    """The export's ``statecast.json``: everything a runtime needs to drive the graph."""
    graph = onnx.load(str(graph_dir / GRAPH_FILE), load_external_data=False).graph
    inputs = {v.name: _value_info(v) for v in graph.input}
    outputs = {v.name: _value_info(v) for v in graph.output}
    init = model.init_state(1)
    state = []
    for s in slots:
        t = getattr(init, s.field)[s.row]  # [1, ...]; a KV tensor has length 0
        shape = [BATCH] + list(t.shape[1:])
        state.append({
            "input": s.input, "output": s.output, "layer": s.layer, "field": s.field,
            "dtype": dtype_name(t.dtype), "shape": inputs[s.input]["shape"], "length_axis": s.spec.length_axis,
            "initial": {"shape": shape, "fill": _fill_value(t)},
        })
    cfg = um.config
    hf = um.source.get("hf_config") or {}
    return {
        "format": FORMAT,
        "family": um.family,
        "source": um.source.get("id"),
        "model": str(um.path),
        "graph": GRAPH_FILE,
        "external_data": external,
        "dtype": dtype,
        "quantization": QUANTIZATION if dtype == "int8" else None,
        "opset": OPSET,
        "exporter": f"torch.onnx.export (TorchScript), torch {torch.__version__}",
        "statecast": __version__,
        "vocab_size": cfg["vocab_size"],
        "n_layer": cfg["n_layer"],
        "sequence_length": "dynamic" if dynamic_length else 1,
        "max_positions": cfg["max_positions"] if cfg.get("positions") == "learned" else None,
        "inputs": [inputs[n] for n in ["input_ids"] + [s.input for s in slots]],
        "outputs": [outputs[n] for n in ["logits"] + [s.output for s in slots]],
        "state": state,
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_id": hf.get("eos_token_id"),
        "tokenizer": tokenizer,
        "genai_config": None,
        "moe_op": next((m.op for m in model.modules() if isinstance(m, TracedMoE)), None),  # None: no experts
        "parity": PARITY_FILE,
    }


def genai_config(desc: dict, um) -> dict | None:
    """onnxruntime-genai's ``genai_config.json`` for a model whose whole state is an attention
    KV cache of a model type genai knows (GPT-2, Llama, Mistral, Qwen2); None otherwise
    (genai has no recurrent-state models). No attention_mask / position_ids inputs: genai
    feeds only the inputs a graph has, and this graph derives positions from the past length."""
    fields = {s["field"] for s in desc["state"]}
    model_type = (um.source.get("hf_config") or {}).get("model_type")
    genai_type = next((a.genai_type for a in FAMILIES[um.family].hf if a.model_type == model_type), None)
    if fields != {"key", "value"} or genai_type is None:
        return None
    cfg = um.config
    eos = desc["eos_token_id"] if desc["eos_token_id"] is not None else 0
    context = cfg["max_positions"]
    return {
        "model": {
            "bos_token_id": desc["bos_token_id"] if desc["bos_token_id"] is not None else eos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": GRAPH_FILE,
                "head_size": cfg["head_dim"],
                "hidden_size": cfg["d_model"],
                "inputs": {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": cfg["n_head"],
                "num_hidden_layers": cfg["n_layer"],
                "num_key_value_heads": cfg["n_kv_head"],
            },
            "eos_token_id": eos,
            "pad_token_id": eos,
            "type": genai_type,
            "vocab_size": cfg["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


# --------------------------------------------------------------------------- parity


def parity_line(p: dict) -> str:
    """The check's headline numbers for a person (a report or an export summary's ``parity``)."""
    return (f"max_abs_diff {p['max_abs_diff']:.3g} (relative {show(p['rel_max_abs_diff'], '.3g')}), "
            f"nmse {show(p['nmse_db'], '.1f')} dB, top1 {p['top1_agreement']:.4f}, kl_mean {p['kl_mean']:.3g}")


def _feed(ort_model: OnnxModel, ids: Tensor, chunks: tuple[int, ...], bar) -> Tensor:
    """ids [B, T] through onnxruntime in calls of ``chunks`` tokens from the empty state -> logits [B, T, V] float64."""
    state = ort_model.init_state(ids.shape[0])
    out, start = [], 0
    for n in chunks:
        logits, state = ort_model.run(ids[:, start : start + n].numpy(), state)
        out.append(torch.from_numpy(logits.astype("float64")))
        start += n
        bar.update(1)
    return torch.cat(out, 1)


@torch.inference_mode()
def check_parity(export_dir: Path, reference: nn.Module, dtype: str, provider: str = "cpu", progress: bool = False) -> dict:
    """Run the export in onnxruntime (through :class:`OnnxModel`, as users do) against the
    float32 PyTorch model on a fixed random [2, 64] sequence: fed one token per call, and for
    dynamic-T graphs also as a chunked prefill (:data:`PARITY_CHUNKS`); plus 32 greedy tokens.
    Judged by ``THRESHOLDS[dtype]`` over all positions of all runs."""
    from tqdm import tqdm

    ort_model = OnnxModel(export_dir, provider=provider)
    ids = random_ids(ort_model.vocab_size)
    B, T = ids.shape
    # the graph runs the step's rules: where the reference's own paths differ, so does the
    # PyTorch model it is compared with (CausalLM.parallel_as_step)
    with reference.parallel_as_step() as step_rules:
        ref = reference(ids)[0].double()  # [B, T, V]
        prompt = ids[0, :GREEDY_PROMPT].tolist()
        greedy_torch = generate_ids(reference, prompt, GREEDY_TOKENS)
    runs = {"steps": (1,) * T}
    if ort_model.sequence_length == "dynamic":
        runs["chunks"] = PARITY_CHUNKS
    results, logits = {}, []
    with tqdm(total=sum(len(c) for c in runs.values()), desc=f"parity ({provider}, {dtype})", disable=not progress,
              leave=False) as bar:
        for name, chunks in runs.items():
            ours = _feed(ort_model, ids, chunks, bar)
            logits.append(ours)
            calls = f"{len(chunks)} x 1" if set(chunks) == {1} else "+".join(map(str, chunks))
            results[name] = {"tokens_per_call": calls, **compare_logits([(ours, ref)])}
    metrics = compare_logits([(ours, ref) for ours in logits])
    greedy_onnx = ort_model.generate(prompt, GREEDY_TOKENS)
    thresholds = THRESHOLDS[dtype]
    checks = judge(metrics, thresholds)
    import onnxruntime

    return {
        "passed": all(checks.values()),
        "dtype": dtype,
        "provider": provider,
        **{k: json_metric(v) for k, v in metrics.items()},
        "greedy_agreement": sum(a == b for a, b in zip(greedy_torch, greedy_onnx)) / GREEDY_TOKENS,
        "greedy": {"prompt": prompt, "torch": greedy_torch, "onnx": greedy_onnx},
        "runs": {name: {k: json_metric(v) for k, v in run.items()} for name, run in results.items()},
        "reference": "statecast PyTorch model, float32" + (
            "; whole sequence under the step's rule: " + "; ".join(step_rules) if step_rules else ""),
        "inputs": f"random {B}x{T} seed {PARITY_SEED}",
        "written_despite_failure": False,
        "thresholds": thresholds,
        "checks": checks,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------- export


def default_out(model_path: str | Path, dtype: str) -> Path:
    """``PATH/onnx`` for fp32, ``PATH/onnx-fp16`` / ``PATH/onnx-int8`` for the others."""
    return Path(model_path) / ("onnx" if dtype == "fp32" else f"onnx-{dtype}")


def export_onnx(model_path: str | Path, dtype: str = "fp32", out: str | Path | None = None, force: bool = False,
                provider: str = "cpu", progress: Callable[[str], None] | None = None,
                external_data_bytes: int = EXTERNAL_DATA_BYTES, moe_op: str = "standard",
                allow_parity_failure: bool = False) -> dict:
    """Export the converted model at ``model_path`` to ONNX (see the module docstring), check it
    in onnxruntime, and move it into place only if the check passed (:class:`ParityFailed`,
    exit 1, otherwise; nothing is left behind). Returns a summary dict (``--json``).

    ``moe_op``: how a mixture of experts is written (:data:`MOE_OPS`); models without one
    ignore it. ``allow_parity_failure``: write the graph even when the check fails, the
    failure recorded in its ``parity.json`` (``written_despite_failure``) and the summary."""
    if dtype not in ONNX_DTYPES:
        raise StatecastError(f"unknown --dtype {dtype!r} for ONNX; choose {', '.join(ONNX_DTYPES)}")
    if moe_op not in MOE_OPS:
        raise StatecastError(f"unknown --moe-op {moe_op!r}; choose {', '.join(MOE_OPS)}")
    provider_name(provider)  # before any work: a missing provider is an error now, not after tracing
    um = open_unified(model_path)
    say = progress or (lambda msg: None)
    out = Path(out) if out is not None else default_out(um.path, dtype)
    # the pure path: it is what the graph is traced from, and the reference it is checked against
    reference, _ = load_model(um, dtype="float32", kernels="torch")
    model = reference if TRACE_DTYPE[dtype] == "float32" else load_model(um, dtype=TRACE_DTYPE[dtype], kernels="torch")[0]
    family = FAMILIES[um.family]
    slots = state_slots(model, family.state)
    swap_moe(model, moe_op)  # each MoE layer traced as one node; eager (the parity reference) as before
    dynamic_length = family.onnx_dynamic_length
    with atomic_directory(out, force=force, keep=[um.path]) as tmp:
        scratch = tmp / ".trace"
        scratch.mkdir()
        say(f"tracing the {um.family} model ({TRACE_DTYPE[dtype]}, T {'dynamic' if dynamic_length else '1'})")
        trace_graph(model, slots, dynamic_length, um.config["vocab_size"], scratch / GRAPH_FILE)
        graph = scratch / GRAPH_FILE
        if dtype == "int8":
            say("quantizing (dynamic int8)")
            quantize_int8(graph, scratch / "int8.onnx")
            graph = scratch / "int8.onnx"
        external = save_graph(graph, tmp, external_data_bytes)
        shutil.rmtree(scratch)
        tokenizer = um.tokenizer_files()  # names checked to stay inside the model (and so inside tmp)
        for name in tokenizer:
            shutil.copyfile(um.path / name, tmp / name)
        desc = describe(model, um, slots, dtype, dynamic_length, tmp, external, tokenizer)
        genai = genai_config(desc, um)
        if genai is not None:
            desc["genai_config"] = GENAI_FILE
            (tmp / GENAI_FILE).write_text(json.dumps(genai, indent=2) + "\n")
        (tmp / DESCRIPTION).write_text(json.dumps(desc, indent=2) + "\n")
        say(f"parity check in onnxruntime ({provider})")
        report = check_parity(tmp, reference, dtype, provider=provider, progress=progress is not None)
        report["written_despite_failure"] = not report["passed"] and allow_parity_failure
        (tmp / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if not report["passed"] and not allow_parity_failure:
            raise ParityFailed(
                f"ONNX parity FAILED ({', '.join(failed(report['checks']))}): {parity_line(report)} vs thresholds "
                f"{report['thresholds']}; nothing was written (--allow-parity-failure writes it anyway)")
    files = sorted(p.name for p in out.iterdir())
    return {
        "path": str(out), "format": "onnx", "family": um.family, "dtype": dtype, "graph": GRAPH_FILE,
        "external_data": external, "bytes": sum((out / f).stat().st_size for f in (GRAPH_FILE, external) if f),
        "sequence_length": desc["sequence_length"], "inputs": len(desc["inputs"]), "outputs": len(desc["outputs"]),
        "genai_config": desc["genai_config"], "moe_op": desc["moe_op"], "files": files,
        "parity": {k: report[k] for k in ("passed", "written_despite_failure", "max_abs_diff", "rel_max_abs_diff", "nmse_db",
                                          "top1_agreement", "kl_mean", "greedy_agreement", "provider")},
    }
