"""Explicit quantization import: fold a QDQ model's Q/DQ nodes into scales, as TensorRT does.

A QDQ (QAT or onnxruntime ``quantize_static``) model says *where* and *with which scales* to
quantize through QuantizeLinear/DequantizeLinear nodes. :func:`import_qdq` returns a NEW float
model (the input is untouched) plus :class:`QuantHints` holding those scales, which the builder
honours instead of calibrating:

* DequantizeLinear of a constant int8 weight (per-tensor or per-axis scale, zero point 0 or
  absent) becomes a float initializer (same name as the DQ output) holding the dequantized
  values (exact float32 products ``w_q * scale``); ``hints.weight_scales[name] = (scales,
  axis)``. int32 biases under a DequantizeLinear likewise become float constants
  (``hints.bias_scales``).
* An activation pair ``QuantizeLinear(t, s, 0) -> DequantizeLinear(q, s, 0)`` with int8 zero
  points 0 and equal per-tensor scales is removed: the DQ's consumers read ``t`` again (a DQ
  output that is a graph output becomes ``Identity(t)``, so the output keeps its name), and
  ``hints.activation_scales[t] = s``. A Q shared by several DQs folds with all of them.
* Everything else stays as explicit fake quantization, marked ``gie.role = "explicit_qdq"``
  with a ``gie.reason``, and listed in ``hints.kept`` as (node name, reason): asymmetric
  (uint8 or nonzero zero point), per-axis activation scales, differing Q and DQ scales, a Q
  whose output is not (only) dequantized, blocked, int4/int16 or float8 quantization.

Only the main graph is rewritten (nested If/Loop bodies are left as they are).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.onnx_io import name_unnamed_nodes
from engine.passes.pipelines import copy_model

ROLE_KEY = "gie.role"
REASON_KEY = "gie.reason"
EXPLICIT_QDQ = "explicit_qdq"
_SYMMETRIC = "int8 layers are symmetric"

#: A weight or bias scale: float32 scales (0-d per-tensor, 1-D per-axis) and the axis
#: (None for a per-tensor scale).
ScaleRecord = tuple[np.ndarray, int | None]


@dataclass(frozen=True, eq=False)
class QuantHints:
    """The scales a QDQ model prescribes, by tensor name, and the Q/DQ nodes left in it.

    ``activation_scales``: real units per int8 step of each activation (float32 values);
    ``weight_scales`` / ``bias_scales``: per float initializer, see :data:`ScaleRecord`;
    ``kept``: (node name, reason) of every Q/DQ node that stayed in the graph.
    """

    activation_scales: dict[str, float] = field(default_factory=dict)
    weight_scales: dict[str, ScaleRecord] = field(default_factory=dict)
    bias_scales: dict[str, ScaleRecord] = field(default_factory=dict)
    kept: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form (float32 scales are exact as JSON numbers)."""

        def records(table: Mapping[str, ScaleRecord]) -> dict[str, Any]:
            return {
                name: {"scales": np.asarray(s).tolist(), "axis": axis}
                for name, (s, axis) in table.items()
            }

        return {
            "activation_scales": dict(self.activation_scales),
            "weight_scales": records(self.weight_scales),
            "bias_scales": records(self.bias_scales),
            "kept": [list(item) for item in self.kept],
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> QuantHints:
        """The hints :meth:`to_json` wrote."""

        def records(table: Mapping[str, Any]) -> dict[str, ScaleRecord]:
            return {
                name: (np.asarray(entry["scales"], dtype=np.float32), entry["axis"])
                for name, entry in table.items()
            }

        return QuantHints(
            {name: float(s) for name, s in data.get("activation_scales", {}).items()},
            records(data.get("weight_scales", {})),
            records(data.get("bias_scales", {})),
            tuple((str(name), str(reason)) for name, reason in data.get("kept", [])),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantHints):
            return NotImplemented
        return json.dumps(self.to_json()) == json.dumps(other.to_json())

    def summary(self) -> str:
        """A few lines for logs: what was folded, what was kept and why."""
        lines = [
            f"QDQ import: {len(self.activation_scales)} activation scales, "
            f"{len(self.weight_scales)} weight scales, {len(self.bias_scales)} bias scales, "
            f"{len(self.kept)} Q/DQ nodes kept"
        ]
        lines.extend(f"  kept {name}: {reason}" for name, reason in self.kept)
        return "\n".join(lines)


def _is_op(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def has_qdq(model: ir.Model) -> bool:
    """True when the main graph has QuantizeLinear/DequantizeLinear nodes other than the
    engine's own precision reformats (``gie.role = "reformat"``)."""
    return any(
        (_is_op(n, "QuantizeLinear") or _is_op(n, "DequantizeLinear"))
        and n.metadata_props.get(ROLE_KEY) != "reformat"
        for n in model.graph
    )


# --------------------------------------------------------------------------- checks


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _zero_point_text(zero_point: np.ndarray) -> str:
    zero_point = zero_point.astype(np.int64)
    nonzero = zero_point[zero_point != 0]
    if nonzero.size == 0:
        return "0"
    if zero_point.size == 1:
        return str(int(zero_point.reshape(-1)[0]))
    return f"{int(nonzero[0])}, ... ({nonzero.size} nonzero of {zero_point.size})"


def _type_refusal(node: ir.Node, allowed: tuple[ir.DataType, ...]) -> str | None:
    """Why the node's quantized type is not one of ``allowed`` (None when it is)."""
    dtype = _quantized_type(node)
    if dtype in allowed:
        return None
    if dtype == ir.DataType.UINT8:
        zero_point = _constant(node.inputs[2] if len(node.inputs) > 2 else None)
        text = "0" if zero_point is None else _zero_point_text(zero_point)
        return f"asymmetric uint8 (zero point {text}): {_SYMMETRIC} and signed"
    name = dtype.name.lower() if dtype is not None else "unknown"
    return f"{name} quantization: only int8 (and int32 biases) are folded"


def _params_refusal(node: ir.Node) -> str | None:
    """Why the node's scale/zero point are not symmetric int8 constants (None when they are)."""
    scale, zero_point = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    block = node.attributes.get_int("block_size", 0)
    if block:
        return f"blocked quantization (block_size {block}) is not supported"
    if _constant(scale) is None:
        return f"scale '{scale.name if scale else ''}' is not a constant"
    if zero_point is not None:
        values = _constant(zero_point)
        if values is None:
            return f"zero point '{zero_point.name}' is not a constant"
        if np.any(values != 0):
            return f"asymmetric (zero point {_zero_point_text(values)}): {_SYMMETRIC}"
    return None


def _quantized_type(node: ir.Node) -> ir.DataType | None:
    """The quantized element type a Q produces or a DQ reads."""
    if _is_op(node, "DequantizeLinear"):
        return node.inputs[0].dtype if node.inputs[0] is not None else None
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point is not None and zero_point.dtype is not None:
        return zero_point.dtype
    code = node.attributes.get_int("output_dtype", 0)
    return ir.DataType(code) if code else ir.DataType.UINT8


def _scale_record(node: ir.Node, scale: np.ndarray, rank: int) -> ScaleRecord:
    if scale.size == 1:
        return np.asarray(scale, dtype=np.float32).reshape(()), None
    axis = node.attributes.get_int("axis", 1)
    return np.asarray(scale, dtype=np.float32).reshape(-1), axis % rank if rank else 0


# --------------------------------------------------------------------------- the importer


class _Importer:
    """Folds the Q/DQ nodes of one graph, collecting hints and kept reasons."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.activation_scales: dict[str, float] = {}
        self.weight_scales: dict[str, ScaleRecord] = {}
        self.bias_scales: dict[str, ScaleRecord] = {}
        self.kept: dict[str, str] = {}
        self.touched: set[ir.Value] = set()

    def keep(self, node: ir.Node, reason: str) -> None:
        node.metadata_props[ROLE_KEY] = EXPLICIT_QDQ
        node.metadata_props[REASON_KEY] = reason
        self.kept.setdefault(node.name or node.op_type, reason)

    def remove(self, node: ir.Node) -> None:
        self.touched.update(v for v in node.inputs if v is not None)
        self.graph.remove(node, safe=True)

    # ---------------------------------------------------------------- DequantizeLinear

    def dequantize(self, node: ir.Node) -> None:
        source = node.inputs[0]
        assert source is not None
        producer = source.producer()
        if _constant(source) is not None:
            self.fold_constant(node)
        elif _is_op(producer, "QuantizeLinear"):
            assert producer is not None
            self.fold_pair(producer, node)
        else:
            origin = f"{producer.op_type} '{producer.name}'" if producer else "a graph input"
            self.keep(node, f"its input '{source.name}' comes from {origin}, not a QuantizeLinear")

    def fold_constant(self, node: ir.Node) -> None:
        source, output = node.inputs[0], node.outputs[0]
        assert source is not None
        values = _constant(source)
        assert values is not None
        reason = _type_refusal(node, (ir.DataType.INT8, ir.DataType.INT32))
        reason = reason or _params_refusal(node)
        if reason is not None:
            self.keep(node, reason)
            return
        scale = _constant(node.inputs[1])
        assert scale is not None
        record = _scale_record(node, scale, values.ndim)
        scales, axis = record
        if axis is not None:
            shape = [-1 if i == axis else 1 for i in range(values.ndim)]
            scales = scales.reshape(shape)
        target = node.attributes.get_int("output_dtype", 0)
        dtype = ir.DataType(target).numpy() if target else scale.dtype
        real = (values.astype(np.float32) * scales.astype(np.float32)).astype(dtype)
        name = output.name or f"{node.name}_output"
        output.name = f"{name}/dequantized"
        constant = ir.Value(name=name, shape=ir.Shape(real.shape), const_value=ir.tensor(real))
        constant.type = ir.TensorType(ir.DataType.from_numpy(real.dtype))
        self.graph.register_initializer(constant)
        output.replace_all_uses_with(constant, replace_graph_outputs=True)
        table = self.bias_scales if source.dtype == ir.DataType.INT32 else self.weight_scales
        table[name] = record
        self.remove(node)

    # ---------------------------------------------------------------- Q -> DQ pairs

    def pair_refusal(self, quantize: ir.Node, dequantize: ir.Node) -> str | None:
        reason = _type_refusal(quantize, (ir.DataType.INT8,))
        reason = reason or _params_refusal(quantize) or _params_refusal(dequantize)
        if reason is not None:
            return reason
        q_scale, dq_scale = _constant(quantize.inputs[1]), _constant(dequantize.inputs[1])
        assert q_scale is not None and dq_scale is not None
        if q_scale.size != 1:
            axis = quantize.attributes.get_int("axis", 1)
            return (
                f"per-axis activation scales (axis {axis}, {q_scale.size} values): "
                "activations take one per-tensor scale"
            )
        if dq_scale.size != 1 or np.float32(dq_scale.reshape(-1)[0]) != np.float32(
            q_scale.reshape(-1)[0]
        ):
            return (
                f"the QuantizeLinear scale {float(q_scale.reshape(-1)[0]):g} and the "
                f"DequantizeLinear scale {dq_scale.reshape(-1).tolist()} differ"
            )
        tensor = quantize.inputs[0]
        assert tensor is not None
        known = self.activation_scales.get(tensor.name or "")
        if known is not None and known != float(np.float32(q_scale.reshape(-1)[0])):
            return f"tensor '{tensor.name}' already has activation scale {known:g}"
        return None

    def fold_pair(self, quantize: ir.Node, dequantize: ir.Node) -> None:
        reason = self.pair_refusal(quantize, dequantize)
        if reason is not None:
            self.keep(dequantize, reason)
            self.keep(quantize, reason)
            return
        tensor, output = quantize.inputs[0], dequantize.outputs[0]
        scale = _constant(quantize.inputs[1])
        assert tensor is not None and scale is not None
        self.activation_scales[tensor.name or ""] = float(np.float32(scale.reshape(-1)[0]))
        if output.is_graph_output():
            identity = ir.Node("", "Identity", [tensor], name=dequantize.name, metadata_props={})
            ir.convenience.replace_nodes_and_values(
                self.graph, dequantize, [dequantize], [identity], [output], identity.outputs
            )
            self.touched.update(v for v in dequantize.inputs if v is not None)
            return
        output.replace_all_uses_with(tensor)
        self.remove(dequantize)

    def finish_quantize(self, node: ir.Node) -> None:
        """Remove a Q whose every DQ was folded; keep any other Q with a reason."""
        output = node.outputs[0]
        users = [user for user, _ in output.uses()]
        if not users and not output.is_graph_output():
            self.remove(node)
            return
        if node.metadata_props.get(ROLE_KEY) == EXPLICIT_QDQ:
            return
        if output.is_graph_output():
            self.keep(node, f"its quantized output '{output.name}' is a graph output")
        elif not any(_is_op(user, "DequantizeLinear") for user in users):
            self.keep(node, "no DequantizeLinear reads its output")
        else:
            other = next(u for u in users if not _is_op(u, "DequantizeLinear"))
            self.keep(node, f"its output is also read by {other.op_type} '{other.name}'")

    def prune_initializers(self) -> None:
        """Drop the int8 weights, scales and zero points nothing reads any more."""
        for value in self.touched:
            name = value.name or ""
            if (
                self.graph.initializers.get(name) is value
                and not value.uses()
                and not value.is_graph_output()
                and not value.is_graph_input()
            ):
                del self.graph.initializers[name]


def import_qdq(model: ir.Model) -> tuple[ir.Model, QuantHints]:
    """Fold the Q/DQ nodes of a copy of ``model`` into :class:`QuantHints` (see module doc).

    Returns the new float model (kept Q/DQ nodes marked ``gie.role = "explicit_qdq"``) and
    the hints; ``model`` itself is not modified.
    """
    working = copy_model(model)
    graph = working.graph
    name_unnamed_nodes(graph)
    importer = _Importer(graph)
    for node in list(graph):
        if _is_op(node, "DequantizeLinear"):
            importer.dequantize(node)
    for node in list(graph):
        if _is_op(node, "QuantizeLinear"):
            importer.finish_quantize(node)
    importer.prune_initializers()
    hints = QuantHints(
        importer.activation_scales,
        importer.weight_scales,
        importer.bias_scales,
        tuple(importer.kept.items()),
    )
    return working, hints


__all__ = [
    "EXPLICIT_QDQ",
    "REASON_KEY",
    "ROLE_KEY",
    "QuantHints",
    "ScaleRecord",
    "has_qdq",
    "import_qdq",
]
