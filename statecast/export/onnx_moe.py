"""A mixture of experts as the exporter writes it: each ``layers.MoE`` traced as one node
(:func:`swap_moe`, before tracing), and the rewrite of ``statecast.MoE`` nodes into standard
ONNX ops (:func:`expand_moe`, after it).

Dimension letters: N tokens (B * T), C d_model, F d_ffn, X experts, k chosen per token.

A :class:`TracedMoE` layer traces as the router's MatMul and one node, by the exporter's
``--moe-op``:
  * ``"standard"``: ``statecast.MoE(x [N, C], logits [N, X], gate [X, F, C], up [X, F, C],
    down [X, C, F])`` with attributes ``k`` and ``normalize``, a placeholder that no runtime
    runs. :func:`expand_moe` replaces each with the routing of ``layers.top_k_route`` and
    one ``If`` per expert:

    probs   = Softmax(float32(logits))                  [N, X]
    w, idx  = TopK(probs, k)  (w / sum w if normalize)  [N, k]
    dense   = ScatterElements(0, idx, w)                [N, X]  each token's weight per expert
    chosen  = ReduceMax(ScatterElements(0, idx, 1), 0)  [X]     chosen by any token
    y_e     = If(chosen[e], dense[:, e] * down_e(silu(gate_e x) * up_e x), 0)   [N, C]
    y       = Sum(y_0 .. y_{X-1})

    Each expert's matrices stay in place as MatMul weights inside its branch, so a decode
    step reads only the chosen experts' bytes (the gathered form copies them per token), and
    int8 quantization reaches them like any other MatMul. A batch computes each chosen
    expert for all of its tokens (the others with weight 0): small batches are bound by
    weight reads, which this keeps at the union of the chosen experts.
  * ``"com.microsoft"``: onnxruntime's contrib ``MoE(x, logits, fc1, bias1, fc2)``
    (contrib_defs.cc ``MoE``: softmax over the router logits, top-k, optional
    renormalisation, SwiGLU experts with gate and up rows interleaved in one ``fc1``).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from ..arch.layers import MoE, gathered_experts, top_k_route

DOMAIN = "statecast"


# --------------------------------------------------------------------------- tracing


class _MoENode(torch.autograd.Function):
    """A MoE layer as one node of a traced graph, by ``op`` (:class:`TracedMoE`): ``statecast.MoE(x,
    logits, gate, up, down)`` or ``com.microsoft.MoE(x, logits, fc1, bias1, fc2)``. Its value
    while tracing (which the tracer runs, not records) is the same sum through
    ``layers.gathered_experts``."""

    @staticmethod
    def forward(ctx, x, logits, w1, w2, w3, k: int, normalize: int, op: str):
        weights, index = top_k_route(logits, k, bool(normalize))
        gate, up = (w1, w2) if op == "standard" else (w1[:, 0::2], w1[:, 1::2])  # fc1 interleaves g, u rows
        return gathered_experts(x, weights.to(x.dtype), index, gate, up, w3, F.silu)

    @staticmethod
    def symbolic(g, x, logits, w1, w2, w3, k: int, normalize: int, op: str):
        if op == "standard":
            out = g.op(f"{DOMAIN}::MoE", x, logits, w1, w2, w3, k_i=k, normalize_i=normalize)
        else:
            out = g.op("com.microsoft::MoE", x, logits, w1, w2, w3, k_i=k, activation_type_s="swiglu",
                       swiglu_fusion_i=1, activation_alpha_f=1.0, activation_beta_f=0.0, normalize_routing_weights_i=normalize)
        out.setType(x.type())  # [N, C] like x: the exporter cannot infer a custom op's shape
        return out


class TracedMoE(nn.Module):
    """``moe`` (a ``layers.MoE``) as the exporter traces it: one node per layer, by ``op``
    (``"standard"`` or ``"com.microsoft"``, see the module doc). Outside tracing it is
    ``moe`` itself (its grouped / gathered paths), so a model swapped for export still
    serves as the parity reference."""

    def __init__(self, moe: MoE, op: str):
        super().__init__()
        if op not in ("standard", "com.microsoft"):
            raise ValueError(f"unknown MoE op {op!r}")
        if moe.act_name != "silu":  # both nodes compute SwiGLU experts
            raise ValueError(f"ONNX export of a MoE computes silu-gated experts, not {moe.act_name!r}")
        self.op, self.top_k, self.normalize = op, moe.top_k, int(moe.normalize)
        # moe's router and expert tables, shared, under moe's own names: the swapped model's
        # module paths and parameter names are the original's, and so are the traced graph's
        # node and initializer names (the int8 quantizer keeps ".../moe/router/MatMul" float by
        # its "/router/"; expand_moe names the per-expert matrices after the tables)
        self.router, self.gate, self.up, self.down = moe.router, moe.gate, moe.up, moe.down
        self.eager = moe.forward  # a bound method, not a submodule: moe's parameters keep one name each

    def extra_repr(self) -> str:
        return f"op={self.op}"

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_tracing():  # torch.onnx.export's TorchScript path is the one traced
            return self.eager(x)
        B, T, C = x.shape
        return self._node(x.reshape(B * T, C)).view(B, T, C)

    def _node(self, x: Tensor) -> Tensor:
        """x [N, C] -> [N, C] as the router's MatMul and one node."""
        logits = self.router(x)  # [N, X]: an ordinary MatMul in the graph
        if self.op == "standard":
            return _MoENode.apply(x, logits, self.gate, self.up, self.down, self.top_k, self.normalize, self.op)
        X, F_, C = self.gate.shape
        fc1 = torch.stack([self.gate, self.up], 2).reshape(X, 2 * F_, C)  # rows g0, u0, g1, u1, ...
        bias1 = torch.zeros(X, 2 * F_, dtype=x.dtype)  # a placeholder: fc2's slot comes after it
        return _MoENode.apply(x, logits, fc1, bias1, self.down, self.top_k, self.normalize, self.op)


def swap_moe(model: nn.Module, op: str) -> nn.Module:
    """Replace every ``layers.MoE`` of ``model`` (in place, at the same module path) by a
    :class:`TracedMoE` writing ``op``; returns ``model``. The exporter calls this before
    tracing: the architecture code knows nothing of ONNX ops."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE):
                setattr(parent, name, TracedMoE(child, op))
    return model


# --------------------------------------------------------------------------- the If rewrite


def _branch(name: str, nodes: list, out: str, elem_type: int) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, elem_type, None)])


def _expand_one(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> tuple[list, list]:
    """(new nodes, new initializers) computing ``node``'s output with standard ops."""
    x, logits, gate_name, up_name, down_name = node.input
    y = node.output[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, normalize = int(attrs["k"]), bool(attrs["normalize"])
    gate, up, down = weights[gate_name], weights[up_name], weights[down_name]  # [X, F, C], [X, F, C], [X, C, F]
    X = gate.shape[0]
    elem = helper.np_dtype_to_tensor_dtype(gate.dtype)
    p = node.name  # unique in the graph, e.g. /model/layers.1/moe/MoE: its replacement's scope
    n = lambda s: f"{p}/{s}"  # noqa: E731 (node and value names)
    inits = [numpy_helper.from_array(np.array([k], np.int64), n("k"))]
    nodes = [
        helper.make_node("Cast", [logits], [n("logits_f32")], to=TensorProto.FLOAT, name=n("Cast")),
        helper.make_node("Softmax", [n("logits_f32")], [n("probs")], axis=-1, name=n("Softmax")),
        helper.make_node("TopK", [n("probs"), n("k")], [n("top_w"), n("top_i")], axis=-1, name=n("TopK")),
    ]
    w = n("top_w")
    if normalize:
        nodes += [helper.make_node("ReduceSum", [w, n("minus1")], [n("top_w_sum")], keepdims=1, name=n("ReduceSum")),
                  helper.make_node("Div", [w, n("top_w_sum")], [n("top_w_norm")], name=n("Div"))]
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), n("minus1")))
        w = n("top_w_norm")
    zero = helper.make_tensor("zero", elem, [1], [0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1])
    nodes += [
        helper.make_node("Cast", [w], [n("top_w_x")], to=elem, name=n("Cast_1")),
        helper.make_node("Shape", [logits], [n("shape_NX")], name=n("Shape")),
        helper.make_node("ConstantOfShape", [n("shape_NX")], [n("zeros_NX")], value=zero, name=n("ConstantOfShape")),
        helper.make_node("ScatterElements", [n("zeros_NX"), n("top_i"), n("top_w_x")], [n("dense")], axis=1,
                         name=n("ScatterElements")),  # [N, X]: each token's weight per expert, 0 if not chosen
        helper.make_node("Shape", [n("top_i")], [n("shape_Nk")], name=n("Shape_1")),
        helper.make_node("ConstantOfShape", [n("shape_Nk")], [n("ones_Nk")], value=one, name=n("ConstantOfShape_1")),
        helper.make_node("ConstantOfShape", [n("shape_NX")], [n("zeros_NX_f32")],
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0]), name=n("ConstantOfShape_2")),
        helper.make_node("ScatterElements", [n("zeros_NX_f32"), n("top_i"), n("ones_Nk")], [n("hits")], axis=1,
                         name=n("ScatterElements_1")),
        helper.make_node("ReduceMax", [n("hits")], [n("hits_any")], axes=[0], keepdims=0, name=n("ReduceMax")),
        helper.make_node("Cast", [n("hits_any")], [n("chosen")], to=TensorProto.BOOL, name=n("Cast_2")),  # [X]
        helper.make_node("Shape", [x], [n("shape_NC")], name=n("Shape_2")),
        helper.make_node("ConstantOfShape", [n("shape_NC")], [n("zeros_NC")], value=zero, name=n("ConstantOfShape_3")),
    ]
    outs = []
    base = gate_name.rsplit(".", 1)[0]  # the layer's tensor names, e.g. model.layers.1.moe
    for e in range(X):
        q = lambda s, e=e: n(f"experts.{e}/{s}")  # noqa: E731
        for mat, name in ((gate[e].T, "gate"), (up[e].T, "up"), (down[e].T, "down")):  # [C, F], [C, F], [F, C]
            inits.append(numpy_helper.from_array(np.ascontiguousarray(mat), f"{base}.experts.{e}.{name}"))
        inits.append(numpy_helper.from_array(np.array([e], np.int64), q("index")))
        inits.append(numpy_helper.from_array(np.array(e, np.int64), q("scalar_index")))
        then = _branch(q("then"), [
            helper.make_node("MatMul", [x, f"{base}.experts.{e}.gate"], [q("g")], name=q("gate/MatMul")),
            helper.make_node("Sigmoid", [q("g")], [q("g_sig")], name=q("Sigmoid")),
            helper.make_node("Mul", [q("g"), q("g_sig")], [q("g_act")], name=q("Mul")),  # silu
            helper.make_node("MatMul", [x, f"{base}.experts.{e}.up"], [q("u")], name=q("up/MatMul")),
            helper.make_node("Mul", [q("g_act"), q("u")], [q("h")], name=q("Mul_1")),
            helper.make_node("MatMul", [q("h"), f"{base}.experts.{e}.down"], [q("d")], name=q("down/MatMul")),
            helper.make_node("Gather", [n("dense"), q("index")], [q("w")], axis=1, name=q("Gather")),  # [N, 1]
            helper.make_node("Mul", [q("d"), q("w")], [q("y_then")], name=q("Mul_2")),
        ], q("y_then"), elem)
        other = _branch(q("else"), [helper.make_node("Identity", [n("zeros_NC")], [q("y_else")], name=q("Identity"))],
                        q("y_else"), elem)
        nodes += [
            helper.make_node("Gather", [n("chosen"), q("scalar_index")], [q("chosen")], axis=0, name=q("Gather_1")),
            helper.make_node("If", [q("chosen")], [q("y")], then_branch=then, else_branch=other, name=q("If")),
        ]
        outs.append(q("y"))
    nodes.append(helper.make_node("Sum", outs, [y], name=n("Sum")))
    return nodes, inits


def expand_moe(model: onnx.ModelProto) -> int:
    """Replace every ``statecast.MoE`` node of ``model`` (in place); returns how many. The
    stacked expert tables they read are dropped for per-expert transposed matrices."""
    graph = model.graph
    targets = [node for node in graph.node if node.domain == DOMAIN]
    if not targets:
        return 0
    unknown = {node.op_type for node in targets} - {"MoE"}
    if unknown:
        raise ValueError(f"unknown {DOMAIN} ops in the traced graph: {sorted(unknown)}")
    tables = {name for node in targets for name in node.input[2:]}
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in tables}
    missing = tables - set(weights)
    if missing:
        raise ValueError(f"MoE expert tables are not constants of the graph: {sorted(missing)}")
    new_nodes, new_inits = [], []
    for node in graph.node:
        if node.domain == DOMAIN:
            nodes, inits = _expand_one(node, weights)
            new_nodes += nodes
            new_inits += inits
        else:
            new_nodes.append(node)
    kept = [t for t in graph.initializer if t.name not in tables]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    for i, opset in enumerate(model.opset_import):
        if opset.domain == DOMAIN:
            del model.opset_import[i]
            break
    return len(targets)
