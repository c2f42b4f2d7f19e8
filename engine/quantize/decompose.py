"""Decompose the engine's fused float ops (domain ``gie``) back into standard ONNX ops.

:func:`decompose_gie_ops` returns a new model (the input is untouched) in which every
gie::ConvAct, GemmAct, Pointwise, LayerNorm, RMSNorm, Gelu and Attention node is replaced by
standard ONNX nodes (opset 17 or the model's own, when newer) computing the same thing, so
that onnxruntime, Netron or any ONNX tool can run or read the engine's model:

* ConvAct / GemmAct: Conv, Gemm or MatMul + Add(bias), then the epilogue (residual Add and the
  activation as its standard op; SiLU as ``Mul(x, Sigmoid(x))``, GELU with the Erf formula,
  GELU_tanh with the tanh formula);
* Pointwise: one node per operator of its expression tree (shared subtrees emitted once);
* LayerNorm, RMSNorm, Gelu and Attention: see :mod:`engine.quantize.decompose_transformer`.

The ops that the reference kernels compute in float32 for float16 inputs (Pointwise and the
transformer ops) get Casts around them, so a float16 model keeps the same rounding. New nodes
are named ``<fused node name>/<part>`` and copy the fused node's ``metadata_props``
(provenance, precision). The int8 ops (gie::QConv, QGemm, QMatMul) are not float ops: see
:func:`engine.quantize.qdq_export.export_qdq`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.gie_pointwise import Call, Expr, Input, Literal, inputs_used, parse_expression
from engine.ops.registry import GIE_DOMAIN, Attrs
from engine.passes.pipelines import copy_model

#: The default-domain opset the decomposed model needs at least (LayerNormalization).
MIN_OPSET = 17

_CONV_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
_GEMM_ATTRIBUTES = ("alpha", "beta", "transA", "transB")


class DecomposeError(ValueError):
    """A gie node cannot be written with standard ops (the message names the node and why)."""


class Emitter:
    """Builds the standard nodes replacing one fused node, named ``<fused name>/<part>``.

    ``names`` is the set of value and node names already taken in the model; new names are
    added to it so that every name stays unique.
    """

    def __init__(self, graph: ir.Graph, fused: ir.Node, names: set[str], opset: int) -> None:
        self.graph = graph
        self.fused = fused
        self.names = names
        self.opset = opset
        self.prefix = fused.name or fused.op_type
        self.nodes: list[ir.Node] = []

    def _unique(self, base: str) -> str:
        name, index = base, 1
        while name in self.names:
            index += 1
            name = f"{base}_{index}"
        self.names.add(name)
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        part: str,
        attributes: dict[str, Any] | None = None,
    ) -> ir.Value:
        """Add a standard node ``op_type`` and return its (single) output."""
        name = self._unique(f"{self.prefix}/{part}")
        present = list(inputs)
        while present and present[-1] is None:  # trailing optional inputs are left out
            present.pop()
        node = ir.Node(
            "",
            op_type,
            present,
            ir.convenience.convert_attributes(attributes or {}),
            name=name,
            metadata_props=dict(self.fused.metadata_props),
        )
        node.outputs[0].name = self._unique(f"{name}_output")
        self.nodes.append(node)
        return node.outputs[0]

    def constant(self, array: np.ndarray, part: str) -> ir.Value:
        """A new initializer holding ``array``."""
        name = self._unique(f"{self.prefix}/{part}")
        value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
        value.type = ir.TensorType(ir.DataType.from_numpy(np.asarray(array).dtype))
        value.shape = ir.Shape(np.asarray(array).shape)
        self.graph.register_initializer(value)
        return value

    def scalar(self, number: float, dtype: np.dtype, part: str) -> ir.Value:
        """A 0-d constant of ``dtype``."""
        with np.errstate(over="ignore"):
            return self.constant(np.array(number, dtype=dtype), part)

    def cast(self, value: ir.Value, target: ir.DataType, part: str) -> ir.Value:
        """``value`` cast to ``target`` (no node when its dtype already is ``target``)."""
        if value.dtype == target:
            return value
        return self.op("Cast", [value], part, {"to": int(target)})


def value_dtype(value: ir.Value | None, default: ir.DataType = ir.DataType.FLOAT) -> ir.DataType:
    """The value's element type, ``default`` when unknown."""
    if value is None or value.dtype is None:
        return default
    return value.dtype


def compute_type(values: Sequence[ir.Value | None]) -> ir.DataType:
    """float64 when an input is float64, else float32 (as the fused reference kernels)."""
    if any(v is not None and v.dtype == ir.DataType.DOUBLE for v in values):
        return ir.DataType.DOUBLE
    return ir.DataType.FLOAT


def node_input(node: ir.Node, index: int) -> ir.Value | None:
    """Input ``index`` of ``node``, None when missing (an omitted trailing optional input)."""
    return node.inputs[index] if len(node.inputs) > index else None


# --------------------------------------------------------------------------- activations


def emit_gelu(em: Emitter, x: ir.Value, dtype: np.dtype, approximate: str, part: str) -> ir.Value:
    """``0.5 x (1 + erf(x / sqrt 2))`` or the tanh form ``0.5 x (1 + tanh(c (x + a x^3)))``."""
    if approximate == "tanh":
        cube = em.op("Mul", [em.op("Mul", [x, x], f"{part}_square"), x], f"{part}_cube")
        scaled = em.op("Mul", [cube, em.scalar(0.044715, dtype, f"{part}_a")], f"{part}_ax3")
        inner = em.op("Add", [x, scaled], f"{part}_inner")
        root = em.scalar(math.sqrt(2.0 / math.pi), dtype, f"{part}_c")
        core = em.op("Tanh", [em.op("Mul", [inner, root], f"{part}_scaled")], f"{part}_tanh")
    elif approximate == "none":
        divided = em.op("Div", [x, em.scalar(math.sqrt(2.0), dtype, f"{part}_sqrt2")], part)
        core = em.op("Erf", [divided], f"{part}_erf")
    else:
        raise DecomposeError(
            f"node '{em.fused.name}': Gelu approximate must be 'none' or 'tanh', "
            f"not {approximate!r}"
        )
    one_plus = em.op("Add", [core, em.scalar(1.0, dtype, f"{part}_one")], f"{part}_one_plus")
    product = em.op("Mul", [x, one_plus], f"{part}_times_x")
    return em.op("Mul", [product, em.scalar(0.5, dtype, f"{part}_half")], f"{part}_half_times")


def emit_activation(em: Emitter, y: ir.Value, attrs: Attrs, dtype: np.dtype) -> ir.Value:
    """The epilogue activation of ``attrs`` (see engine.ops.gie_fused) on ``y``."""
    name = attrs.str("activation", "") or ""
    if name == "":
        return y
    if name in ("Relu", "Sigmoid", "Tanh", "HardSwish"):
        return em.op(name, [y], "act")
    if name in ("Clip", "Relu6"):
        relu6 = name == "Relu6"
        low = attrs.get("min", 0.0 if relu6 else None)
        high = attrs.get("max", 6.0 if relu6 else None)
        bounds = [
            None if b is None else em.scalar(float(b), dtype, f"act_{k}")
            for k, b in (("min", low), ("max", high))
        ]
        return em.op("Clip", [y, *bounds], "act")
    if name == "SiLU":
        return em.op("Mul", [y, em.op("Sigmoid", [y], "act_sigmoid")], "act")
    if name == "LeakyRelu":
        return em.op("LeakyRelu", [y], "act", {"alpha": attrs.float("activation_alpha", 0.01)})
    if name in ("GELU", "GELU_tanh"):
        return emit_gelu(em, y, dtype, "tanh" if name == "GELU_tanh" else "none", "act")
    raise DecomposeError(f"node '{em.fused.name}': unknown activation {name!r}")


def emit_epilogue(
    em: Emitter, y: ir.Value, residual: ir.Value | None, attrs: Attrs, y_type: ir.DataType
) -> ir.Value:
    """Residual add and activation in the order ``residual_before_activation`` says."""
    dtype = y_type.numpy()
    if residual is None:
        return emit_activation(em, y, attrs, dtype)
    if residual.dtype is not None and residual.dtype != y_type:
        residual = em.cast(residual, y_type, "residual_cast")
    if attrs.int("residual_before_activation", 1):
        return emit_activation(em, em.op("Add", [y, residual], "residual"), attrs, dtype)
    return em.op("Add", [emit_activation(em, y, attrs, dtype), residual], "residual")


def _copied(node: ir.Node, names: Sequence[str]) -> dict[str, Any]:
    return {k: a.value for k, a in node.attributes.items() if k in names}


# --------------------------------------------------------------------------- fused layers


def emit_conv_act(
    em: Emitter,
    attrs_of: ir.Node,
    x: ir.Value | None,
    w: ir.Value | None,
    bias: ir.Value | None,
    residual: ir.Value | None,
) -> ir.Value:
    """Conv with the conv attributes of ``attrs_of``, then its epilogue."""
    inputs = [x, w] if bias is None else [x, w, bias]
    y = em.op("Conv", inputs, "conv", _copied(attrs_of, _CONV_ATTRIBUTES))
    return emit_epilogue(em, y, residual, Attrs.from_node(attrs_of), value_dtype(x))


def emit_gemm_act(
    em: Emitter,
    attrs_of: ir.Node,
    a: ir.Value | None,
    b: ir.Value | None,
    bias: ir.Value | None,
    residual: ir.Value | None,
) -> ir.Value:
    """Gemm (``kind`` Gemm) or MatMul + Add(bias) (``kind`` MatMul), then the epilogue."""
    attrs = Attrs.from_node(attrs_of)
    kind = attrs.str("kind", "Gemm") or "Gemm"
    if kind == "MatMul":
        y = em.op("MatMul", [a, b], "matmul")
        if bias is not None:
            y = em.op("Add", [y, bias], "bias")
    elif kind == "Gemm":
        inputs = [a, b] if bias is None else [a, b, bias]
        y = em.op("Gemm", inputs, "gemm", _copied(attrs_of, _GEMM_ATTRIBUTES))
    else:
        raise DecomposeError(f"node '{em.fused.name}': kind must be Gemm or MatMul, not {kind!r}")
    return emit_epilogue(em, y, residual, attrs, value_dtype(a))


def _conv_act(em: Emitter, node: ir.Node) -> list[ir.Value]:
    return [emit_conv_act(em, node, *(node_input(node, i) for i in range(4)))]


def _gemm_act(em: Emitter, node: ir.Node) -> list[ir.Value]:
    return [emit_gemm_act(em, node, *(node_input(node, i) for i in range(4)))]


# --------------------------------------------------------------------------- Pointwise

_UNARY = {
    "neg": "Neg", "abs": "Abs", "sqrt": "Sqrt", "exp": "Exp", "log": "Log", "erf": "Erf",
    "tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu", "reciprocal": "Reciprocal",
    "softplus": "Softplus", "hard_swish": "HardSwish",
}  # fmt: skip
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow"}
_VARIADIC = {"max": "Max", "min": "Min"}


class _ExpressionWriter:
    """Writes an expression tree as standard nodes, each distinct subtree once."""

    def __init__(self, em: Emitter, inputs: list[ir.Value], dtype: np.dtype) -> None:
        self.em, self.inputs, self.dtype = em, inputs, dtype
        self.memo: dict[Expr, ir.Value] = {}
        self.count = 0

    def write(self, tree: Expr) -> ir.Value:
        if tree not in self.memo:
            self.memo[tree] = self._emit(tree)
        return self.memo[tree]

    def _part(self, op: str) -> str:
        self.count += 1
        return f"{op}_{self.count}"

    def _emit(self, tree: Expr) -> ir.Value:
        em = self.em
        if isinstance(tree, Input):
            if tree.index >= len(self.inputs):
                raise DecomposeError(
                    f"node '{em.fused.name}': the expression reads x{tree.index} but the node "
                    f"has {len(self.inputs)} inputs"
                )
            return self.inputs[tree.index]
        if isinstance(tree, Literal):
            return em.scalar(tree.value, self.dtype, self._part("literal"))
        args = [self.write(a) for a in tree.args]
        return self._call(tree, args)

    def _literal(self, tree: Call, index: int) -> float | None:
        arg = tree.args[index]
        return arg.value if isinstance(arg, Literal) else None

    def _call(self, tree: Call, args: list[ir.Value]) -> ir.Value:
        em, op = self.em, tree.op
        if op in _UNARY:
            return em.op(_UNARY[op], args, self._part(op))
        if op in _BINARY:
            return em.op(_BINARY[op], args, self._part(op))
        if op in _VARIADIC:
            return em.op(_VARIADIC[op], args, self._part(op))
        if op == "leaky_relu":
            alpha = self._literal(tree, 1)
            if alpha is not None:
                return em.op("LeakyRelu", args[:1], self._part(op), {"alpha": alpha})
            negative = em.op("Mul", args, self._part("leaky_negative"))
            zero = em.scalar(0.0, self.dtype, self._part("zero"))
            condition = em.op("GreaterOrEqual", [args[0], zero], self._part("leaky_sign"))
            return em.op("Where", [condition, args[0], negative], self._part(op))
        if op == "clip":
            low = em.op("Max", args[:2], self._part("clip_low"))
            return em.op("Min", [low, args[2]], self._part(op))
        if op == "hard_sigmoid":
            alpha, beta = self._literal(tree, 1), self._literal(tree, 2)
            if alpha is not None and beta is not None:
                attributes = {"alpha": alpha, "beta": beta}
                return em.op("HardSigmoid", args[:1], self._part(op), attributes)
            line = em.op("Add", [em.op("Mul", args[:2], self._part("mul")), args[2]], "add")
            low = em.op("Max", [line, em.scalar(0.0, self.dtype, self._part("zero"))], "max")
            one = em.scalar(1.0, self.dtype, self._part("one"))
            return em.op("Min", [low, one], self._part(op))
        raise DecomposeError(f"node '{em.fused.name}': unknown Pointwise operator {op!r}")


def _pointwise(em: Emitter, node: ir.Node) -> list[ir.Value]:
    text = Attrs.from_node(node).str("expression") or ""
    tree = parse_expression(text)
    inputs = [v for v in node.inputs if v is not None]
    work = compute_type(inputs)
    widened = [em.cast(v, work, f"x{i}_cast") for i, v in enumerate(inputs)]
    writer = _ExpressionWriter(em, widened, work.numpy())
    result = writer.write(tree)
    for index in sorted(set(range(len(inputs))) - inputs_used(tree)):
        shape = em.op("Shape", [widened[index]], f"x{index}_shape")
        result = em.op("Expand", [result, shape], f"x{index}_broadcast")
    if result in widened or result in inputs:
        result = em.op("Identity", [result], "identity")
    code = Attrs.from_node(node).get("output_dtype")
    target = (
        ir.DataType(int(code)) if code is not None else value_dtype(inputs[0] if inputs else None)
    )
    return [em.cast(result, target, "output_cast") if target != work else result]


#: The decomposition of each fused layer op: ``(emitter, node) -> values replacing its outputs``.
#: The transformer ops' table is ``TRANSFORMER_DECOMPOSERS`` of decompose_transformer.
DECOMPOSERS: dict[str, Callable[[Emitter, ir.Node], list[ir.Value]]] = {
    "ConvAct": _conv_act,
    "GemmAct": _gemm_act,
    "Pointwise": _pointwise,
}


def decomposer_for(op_type: str) -> Callable[[Emitter, ir.Node], list[ir.Value]] | None:
    """The decomposition of gie op ``op_type`` (fused layers or transformer ops), else None."""
    # Imported here: decompose_transformer builds on this module's Emitter (an import cycle).
    from engine.quantize.decompose_transformer import TRANSFORMER_DECOMPOSERS

    return DECOMPOSERS.get(op_type) or TRANSFORMER_DECOMPOSERS.get(op_type)


# --------------------------------------------------------------------------- the pass


def _graphs(graph: ir.Graph) -> list[ir.Graph]:
    """The graph and every nested graph (If/Loop/Scan bodies), outermost first."""
    found = [graph]
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                found.extend(_graphs(attr.value))
            elif attr.type == ir.AttributeType.GRAPHS:
                for body in attr.value:
                    found.extend(_graphs(body))
    return found


def taken_names(model: ir.Model) -> set[str]:
    """Every node and value name of the model (nested graphs included)."""
    names: set[str] = set()
    for graph in _graphs(model.graph):
        names.update(v.name for v in graph.inputs if v.name)
        names.update(graph.initializers)
        for node in graph:
            if node.name:
                names.add(node.name)
            names.update(v.name for v in node.outputs if v.name)
    return names


def decompose_node(graph: ir.Graph, node: ir.Node, names: set[str], opset: int) -> None:
    """Replace one gie float node of ``graph`` by standard nodes, in place."""
    decomposer = decomposer_for(node.op_type)
    if decomposer is None:
        hint = " (an int8 layer: export it with export_qdq)" if node.op_type.startswith("Q") else ""
        raise DecomposeError(
            f"node '{node.name}': gie::{node.op_type} has no standard-ONNX decomposition{hint}"
        )
    em = Emitter(graph, node, names, opset)
    results = decomposer(em, node)
    outputs = list(node.outputs)
    for old, new in zip(outputs, results):
        if old.name:
            names.discard(new.name or "")
            new.name = None
    ir.convenience.replace_nodes_and_values(graph, node, [node], em.nodes, outputs, results)


def decompose_gie_ops(model: ir.Model) -> ir.Model:
    """A new model with every gie float op replaced by standard ONNX ops (see module doc).

    The default-domain opset is raised to :data:`MIN_OPSET` when lower (opsets 13-16 ops keep
    their meaning at 17). Raises :class:`DecomposeError` for a gie op that has no decomposition.
    """
    working = copy_model(model)
    opset = max(working.opset_imports.get("", 1), MIN_OPSET)
    working.opset_imports[""] = opset
    names = taken_names(working)
    for graph in _graphs(working.graph):
        for node in list(graph):
            if node.domain == GIE_DOMAIN:
                decompose_node(graph, node, names, opset)
    if not any(n.domain == GIE_DOMAIN for g in _graphs(working.graph) for n in g):
        working.opset_imports.pop(GIE_DOMAIN, None)
    return working


__all__ = [
    "DECOMPOSERS",
    "MIN_OPSET",
    "DecomposeError",
    "Emitter",
    "decompose_gie_ops",
    "decompose_node",
    "decomposer_for",
    "emit_activation",
    "emit_conv_act",
    "emit_epilogue",
    "emit_gelu",
    "emit_gemm_act",
    "node_input",
    "taken_names",
]
