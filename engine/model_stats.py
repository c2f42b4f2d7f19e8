"""Static statistics of a model: interface, op histogram, parameters and estimated cost.

:func:`compute_stats` takes an ``onnx_ir.Model`` as :func:`engine.onnx_io.load` returns it (shape
inference done, ``Constant`` nodes lifted to initializers, functions inlined) and applies the
registry's cost rule of every node of the main graph to :class:`TensorSpec` built from the shapes
and dtypes of its inputs and outputs. A node whose tensors do not all have static shapes (or whose
op has no cost rule) contributes nothing to the totals and is listed as "cost unknown". Symbolic
dims can be bound to numbers with ``dim_values`` (``{"batch": 1}``).

The op histogram covers nested graphs (If/Loop/Scan bodies); the FLOPs do not count the body
nodes, since how often a body runs depends on the data.

:func:`format_stats` renders the statistics as the text report of ``gie inspect`` (it returns
lines; only the CLI prints).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.backends.numpy_ref.interpreter import iter_nodes_recursive, node_subgraphs
from engine.onnx_io import UnsupportedOp, unsupported_ops
from engine.ops.registry import (
    RANDOM_OP_TYPES,
    Attrs,
    OpCost,
    OpRegistry,
    TensorSpec,
    default_registry,
)
from engine.ops.shape_inference import declared_spec, value_dims

Dim = int | str | None

#: Constants up to this many elements are handed to cost rules as ``TensorSpec.value``.
_CONST_VALUE_LIMIT = 1024


@dataclass(frozen=True)
class ValueStats:
    """A graph input or output: name, dtype name (NumPy spelling) and shape.

    ``shape`` is None when the rank is unknown; a dim is an int, a symbolic name or None.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None

    def shape_text(self) -> str:
        """'[1,3,224,224]', '[batch,3]', '[?]' or '?' for an unknown rank."""
        if self.shape is None:
            return "?"
        return "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": _shape_json(self.shape)}


@dataclass(frozen=True)
class NodeCost:
    """Estimated cost of one node; ``known`` is False when shapes or the cost rule were missing."""

    name: str
    op_type: str
    known: bool
    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    reason: str = ""

    @property
    def category(self) -> str:
        """Why the cost is unknown, in short: 'no cost rule', 'dynamic shape', 'rule failed'."""
        if self.known:
            return ""
        if self.reason.startswith("no kernel"):
            return "no cost rule"
        return "dynamic shape" if self.reason.startswith("shape not static") else "rule failed"

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "op_type": self.op_type, "known": self.known}
        if self.known:
            row.update(
                flops=self.flops, bytes_read=self.bytes_read, bytes_written=self.bytes_written
            )
        else:
            row["reason"] = self.reason
        return row


@dataclass(frozen=True)
class ModelStats:
    """Everything ``gie inspect`` reports about a model (see the module docstring)."""

    source: str
    ir_version: int
    opset_imports: dict[str, int]
    producer: str
    inputs: tuple[ValueStats, ...]
    outputs: tuple[ValueStats, ...]
    op_counts: dict[str, int]
    node_count: int
    parameter_count: int
    parameter_bytes: int
    initializer_count: int
    folded_parameter_count: int
    folded_parameter_bytes: int
    flops: int
    bytes_read: int
    bytes_written: int
    node_costs: tuple[NodeCost, ...]
    unsupported_ops: tuple[UnsupportedOp, ...]

    @property
    def cost_unknown(self) -> tuple[NodeCost, ...]:
        """Nodes of the main graph whose cost could not be estimated."""
        return tuple(row for row in self.node_costs if not row.known)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (plain ints, strings, lists and dicts)."""
        return {
            "source": self.source,
            "ir_version": self.ir_version,
            "opset_imports": dict(self.opset_imports),
            "producer": self.producer,
            "inputs": [v.to_json() for v in self.inputs],
            "outputs": [v.to_json() for v in self.outputs],
            "op_counts": dict(self.op_counts),
            "node_count": self.node_count,
            "parameters": {
                "count": self.parameter_count,
                "bytes": self.parameter_bytes,
                "initializers": self.initializer_count,
                "folded_count": self.folded_parameter_count,
                "folded_bytes": self.folded_parameter_bytes,
            },
            "flops": self.flops,
            "memory_bytes": {"read": self.bytes_read, "written": self.bytes_written},
            "cost_unknown": [row.name for row in self.cost_unknown],
            "node_costs": [row.to_json() for row in self.node_costs],
            "unsupported_ops": [
                {"op": op.qualified_name, "count": op.count, "nodes": list(op.node_names)}
                for op in self.unsupported_ops
            ],
        }


def dtype_name(dtype: ir.DataType | None) -> str:
    """NumPy-style name of an ONNX dtype ('float32', 'int64', 'bfloat16'); '?' when unknown."""
    if dtype is None:
        return "?"
    if dtype == ir.DataType.STRING:
        return "string"
    try:
        return str(np.dtype(dtype.numpy()))
    except (TypeError, ValueError):
        return dtype.name.lower()


def _shape_json(shape: tuple[Dim, ...] | None) -> list[Dim] | None:
    return None if shape is None else list(shape)


def _value_stats(value: ir.Value) -> ValueStats:
    if value.type is not None and not isinstance(value.type, ir.TensorType):
        return ValueStats(value.name or "", str(value.type), None)
    return ValueStats(value.name or "", dtype_name(value.dtype), value_dims(value))


def tensor_spec(value: ir.Value | None, dim_values: Mapping[str, int] | None = None) -> TensorSpec:
    """TensorSpec of a value from its inferred shape and dtype, symbolic dims bound if given."""
    if value is None:
        return TensorSpec(None, None)
    return declared_spec(value, dim_values, constant_limit=_CONST_VALUE_LIMIT)


def op_key(node: ir.Node) -> str:
    """Histogram key: the op type, prefixed with its domain outside the default ONNX domain."""
    domain = node.domain or ""
    return node.op_type if domain in ("", "ai.onnx") else f"{domain}::{node.op_type}"


def node_label(node: ir.Node, index: int) -> str:
    """The node's name, or '#index' for an unnamed node."""
    return node.name or f"#{index}"


def node_cost(
    node: ir.Node,
    label: str,
    registry: OpRegistry,
    dim_values: Mapping[str, int] | None = None,
) -> NodeCost:
    """Apply the registry's cost rule to one node (unknown when shapes are not all static)."""
    spec = registry.lookup(node.op_type, node.domain)
    if spec is None:
        return NodeCost(label, node.op_type, False, reason="no kernel or cost rule for this op")
    ins = [None if v is None else tensor_spec(v, dim_values) for v in node.inputs]
    outs = [tensor_spec(v, dim_values) for v in node.outputs]
    dynamic = [
        value.name or "?"
        for value, spec_ in zip([*node.inputs, *node.outputs], [*ins, *outs])
        if value is not None and spec_ is not None and not spec_.is_static
    ]
    if dynamic:
        return NodeCost(
            label, node.op_type, False, reason=f"shape not static: {', '.join(dynamic)}"
        )
    try:
        cost: OpCost = spec.cost(ins, outs, Attrs.from_node(node))  # type: ignore[arg-type]
    except Exception as error:  # noqa: BLE001 - a failing cost rule makes the cost unknown
        return NodeCost(label, node.op_type, False, reason=f"{type(error).__name__}: {error}")
    return NodeCost(
        label, node.op_type, True, int(cost.flops), int(cost.bytes_read), int(cost.bytes_written)
    )


def _all_graphs(graph: ir.Graph) -> list[ir.Graph]:
    graphs = [graph]
    for node in iter_nodes_recursive(graph):
        graphs.extend(node_subgraphs(node))
    return graphs


def _parameters(graph: ir.Graph) -> tuple[int, int, int]:
    """(element count, bytes, initializer count) over the initializers of all graphs."""
    count = size = initializers = 0
    for current in _all_graphs(graph):
        for value in current.initializers.values():
            tensor = value.const_value
            initializers += 1
            if tensor is None:
                continue
            count += int(tensor.size)
            size += int(tensor.nbytes)
    return count, size, initializers


#: Ops whose output is not a function of their inputs: never constant, even on constant inputs.
def _folded_parameters(graph: ir.Graph) -> tuple[int, int]:
    """(elements, bytes) of the weights that nodes compute from constants alone.

    The classic "light" models make every weight with ``ConstantOfShape``; an optimizer folds
    such constant subgraphs into weights. Counted: constant outputs read by non-constant nodes
    (or graph outputs), when their shapes are static.
    """
    constant = {v for v in graph.initializers.values() if v.const_value is not None}
    folded: list[ir.Value] = []
    for node in graph:
        if node_subgraphs(node) or node.op_type in RANDOM_OP_TYPES:
            continue
        if all(v is None or v in constant for v in node.inputs):
            constant.update(node.outputs)
            folded.extend(node.outputs)
    count = size = 0
    outputs = set(graph.outputs)
    for value in folded:
        consumers = [node for node, _ in value.uses()]
        frontier = value in outputs or any(
            any(v is not None and v not in constant for v in node.inputs) for node in consumers
        )
        spec = tensor_spec(value)
        if frontier and spec.is_static:
            count += spec.numel()
            size += spec.nbytes()
    return count, size


def compute_stats(
    model: ir.Model,
    registry: OpRegistry | None = None,
    dim_values: Mapping[str, int] | None = None,
) -> ModelStats:
    """Statistics of ``model`` (loaded with :func:`engine.onnx_io.load`)."""
    registry = registry or default_registry()
    graph = model.graph
    counts: Counter[str] = Counter(op_key(node) for node in iter_nodes_recursive(graph))
    costs = tuple(
        node_cost(node, node_label(node, index), registry, dim_values)
        for index, node in enumerate(graph)
    )
    known = [row for row in costs if row.known]
    parameter_count, parameter_bytes, initializer_count = _parameters(graph)
    folded_count, folded_bytes = _folded_parameters(graph)
    return ModelStats(
        source=str(model.meta.get("source", "")),
        ir_version=int(model.ir_version),
        opset_imports={(d or "ai.onnx"): int(v) for d, v in sorted(model.opset_imports.items())},
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        inputs=tuple(_value_stats(v) for v in graph.inputs),
        outputs=tuple(_value_stats(v) for v in graph.outputs),
        op_counts=dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))),
        node_count=sum(counts.values()),
        parameter_count=parameter_count,
        parameter_bytes=parameter_bytes,
        initializer_count=initializer_count,
        folded_parameter_count=folded_count,
        folded_parameter_bytes=folded_bytes,
        flops=sum(row.flops for row in known),
        bytes_read=sum(row.bytes_read for row in known),
        bytes_written=sum(row.bytes_written for row in known),
        node_costs=costs,
        unsupported_ops=tuple(unsupported_ops(model, registry)),
    )


def top_costs(stats: ModelStats, count: int = 10) -> Sequence[NodeCost]:
    """The ``count`` most expensive nodes by FLOPs (known costs only)."""
    known = [row for row in stats.node_costs if row.known]
    return sorted(known, key=lambda row: -row.flops)[:count]
