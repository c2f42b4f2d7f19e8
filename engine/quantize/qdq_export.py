"""Export the engine's precision decisions as a QDQ ONNX model that onnxruntime runs.

:func:`export_qdq` takes the builder's ``plan.model`` (int8 layers as gie::QConv / QGemm /
QMatMul, fp16 layers with float16 weights, explicit reformat nodes between precisions) and
returns a NEW standard-ONNX model in float32 + QDQ form, plus an :class:`ExportReport`:

* gie::QConv -> ``DequantizeLinear(X_q, X_scale)``; the int8 weight initializer under
  ``DequantizeLinear(W_q, W_scale, axis=0)`` (per output channel); a float32 bias initializer
  ``float32(B_q) * (float32(X_scale) * float32(W_scale))``; Conv; the epilogue ops; and, for an
  int8 output, ``QuantizeLinear(Y_scale, zero point int8 0)`` producing the layer's output name.
  QGemm the same way (weight scales on axis 1 of a [K, N] weight, axis 0 of a transB [N, K]
  weight); QMatMul dequantizes both operands.
* reformat Casts between float16 and float32 (``gie.role = "reformat"``) are bypassed (an
  Identity keeps a graph output's name), float16 initializers and values become float32:
  fp16 layers are exported as fp32. Reformat QuantizeLinear/DequantizeLinear nodes and
  explicit Q/DQ pairs (``gie.role = "explicit_qdq"``) stay: they already are QDQ.
* then :func:`engine.quantize.decompose.decompose_gie_ops` writes the remaining gie float ops
  with standard ops (default-domain opset >= 17; per-axis DequantizeLinear needs 13).

A model's own Cast to float16 (not a reformat) is model semantics and is not removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.gie_quant import output_dtype
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelError
from engine.passes.pipelines import copy_model
from engine.quantize.decompose import (
    Emitter,
    decompose_gie_ops,
    emit_conv_act,
    emit_gemm_act,
    taken_names,
)

ROLE_KEY = "gie.role"
PRECISION_KEY = "gie.precision"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


class ExportError(ValueError):
    """The engine model cannot be exported (the message names the layer and why)."""


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_qdq` wrote.

    ``int8_layers``: QConv/QGemm/QMatMul layers exported as Q/DQ + float op;
    ``qdq_written``: QuantizeLinear/DequantizeLinear nodes written for them;
    ``qdq_total``: QuantizeLinear/DequantizeLinear nodes in the exported model (reformats and
    explicit pairs included); ``fp16_layers``: layers the engine runs in fp16, exported as fp32;
    ``casts_removed``: fp16/fp32 reformat Casts bypassed.
    """

    int8_layers: int
    qdq_written: int
    qdq_total: int
    fp16_layers: int
    casts_removed: int

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form."""
        return dict(self.__dict__)

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"QDQ export: {self.int8_layers} int8 layers ({self.qdq_written} Q/DQ nodes written, "
            f"{self.qdq_total} in the model), {self.fp16_layers} fp16 layers exported as fp32, "
            f"{self.casts_removed} reformat casts removed"
        )


def _constant(node: ir.Node, index: int, what: str) -> np.ndarray | None:
    """The constant value of input ``index`` (None when absent); ExportError when not constant."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None:
        return None
    if value.const_value is None:
        raise ExportError(
            f"layer '{node.name}' (gie::{node.op_type}): {what} '{value.name}' is not a constant"
        )
    return value.const_value.numpy()


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


# --------------------------------------------------------------------------- int8 layers


class _LayerWriter:
    """Writes one int8 layer as DequantizeLinear -> float op -> [QuantizeLinear]."""

    def __init__(self, em: Emitter) -> None:
        self.em = em
        self.qdq = 0

    def dequantize(
        self, value: ir.Value | None, scale: ir.Value | None, part: str, **attrs: Any
    ) -> ir.Value:
        """``DequantizeLinear(value, scale)`` (int8, zero point 0)."""
        self.qdq += 1
        return self.em.op("DequantizeLinear", [value, scale], part, attrs or None)

    def weight(self, node: ir.Node, index: int, scale_index: int, axis: int) -> ir.Value:
        """``DequantizeLinear(W_q, W_scale)``: per-axis along ``axis`` or per-tensor."""
        scales = _constant(node, scale_index, "weight scale")
        assert scales is not None
        weight, scale = _input(node, index), node.inputs[scale_index]
        assert scale is not None
        if scales.size == 1:
            scale = self.em.constant(scales.astype(np.float32).reshape(()), "w_scale")
            return self.dequantize(weight, scale, "dequantize_w")
        return self.dequantize(weight, scale, "dequantize_w", axis=axis)

    def bias(self, node: ir.Node, channels: int) -> ir.Value | None:
        """The float32 bias ``B_q * (x_scale * w_scale)`` (None without B_q)."""
        bias = _constant(node, 4, "bias")
        if bias is None:
            return None
        x_scale = _constant(node, 1, "input scale")
        w_scale = _constant(node, 3, "weight scale")
        assert x_scale is not None and w_scale is not None
        combined = np.float32(x_scale.reshape(-1)[0]) * w_scale.astype(np.float32).reshape(-1)
        real = bias.astype(np.float32).reshape(-1) * np.broadcast_to(combined, (channels,))
        return self.em.constant(real.astype(np.float32), "bias")

    def finish(self, node: ir.Node, real: ir.Value, y_scale_index: int) -> ir.Value:
        """``real`` as the layer's output: quantized with Y_scale for an int8 output."""
        y_scale = _input(node, y_scale_index)
        try:
            target = output_dtype(Attrs.from_node(node), y_scale is not None)
        except KernelError as error:
            raise ExportError(f"layer '{node.name}' (gie::{node.op_type}): {error}") from None
        if target != ir.DataType.INT8:
            return real
        assert y_scale is not None
        zero = self.em.constant(np.array(0, dtype=np.int8), "y_zero_point")
        self.qdq += 1
        return self.em.op("QuantizeLinear", [real, y_scale, zero], "quantize_y")


def _weight_channels(node: ir.Node, axis: int) -> int:
    weight = _input(node, 2)
    if weight is None or weight.const_value is None:
        raise ExportError(f"layer '{node.name}' (gie::{node.op_type}): the weight is not constant")
    return int(weight.const_value.shape[axis])


def _qconv(writer: _LayerWriter, node: ir.Node) -> ir.Value:
    x = writer.dequantize(_input(node, 0), node.inputs[1], "dequantize_x")
    w = writer.weight(node, 2, 3, axis=0)
    bias = writer.bias(node, _weight_channels(node, 0))
    real = emit_conv_act(writer.em, node, x, w, bias, _input(node, 5))
    return writer.finish(node, real, 6)


def _qgemm(writer: _LayerWriter, node: ir.Node) -> ir.Value:
    attrs = Attrs.from_node(node)
    transposed = (attrs.str("kind", "Gemm") or "Gemm") == "Gemm" and attrs.int("transB", 0)
    axis = 0 if transposed else 1
    a = writer.dequantize(_input(node, 0), node.inputs[1], "dequantize_a")
    b = writer.weight(node, 2, 3, axis=axis)
    bias = writer.bias(node, _weight_channels(node, axis))
    real = emit_gemm_act(writer.em, node, a, b, bias, _input(node, 5))
    return writer.finish(node, real, 6)


def _qmatmul(writer: _LayerWriter, node: ir.Node) -> ir.Value:
    a = writer.dequantize(_input(node, 0), node.inputs[1], "dequantize_a")
    b = writer.dequantize(_input(node, 2), node.inputs[3], "dequantize_b")
    real = writer.em.op("MatMul", [a, b], "matmul")
    return writer.finish(node, real, 4)


#: How each int8 op is written: ``(writer, node) -> the value replacing its output``.
INT8_WRITERS: dict[str, Callable[[_LayerWriter, ir.Node], ir.Value]] = {
    "QConv": _qconv,
    "QGemm": _qgemm,
    "QMatMul": _qmatmul,
}


def _export_int8_layer(graph: ir.Graph, node: ir.Node, names: set[str], opset: int) -> int:
    """Replace one int8 layer in place; returns the number of Q/DQ nodes written."""
    writer = _LayerWriter(Emitter(graph, node, names, opset))
    result = INT8_WRITERS[node.op_type](writer, node)
    output, inputs = node.outputs[0], [v for v in node.inputs if v is not None]
    names.discard(result.name or "")
    result.name = None
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], writer.em.nodes, [output], [result]
    )
    for value in inputs:  # e.g. the int32 bias, now a float32 initializer
        unused = not value.uses() and not value.is_graph_output() and not value.is_graph_input()
        if unused and graph.initializers.get(value.name or "") is value:
            del graph.initializers[value.name or ""]
    return writer.qdq


# --------------------------------------------------------------------------- fp16 -> fp32


def _is_reformat_cast(node: ir.Node) -> bool:
    if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return False
    to = node.attributes.get_int("to", 0)
    return node.metadata_props.get(ROLE_KEY) == "reformat" and ir.DataType(to) in _FLOATS


def _bypass(graph: ir.Graph, node: ir.Node) -> None:
    """Remove a single-input node; an Identity stands in when its output is a graph output."""
    source, output = node.inputs[0], node.outputs[0]
    assert source is not None
    if output.is_graph_output():
        identity = ir.Node("", "Identity", [source], name=node.name)
        identity.metadata_props.update(node.metadata_props)
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [identity], [output], identity.outputs
        )
        return
    output.replace_all_uses_with(source)
    graph.remove(node, safe=True)


def _float32_everywhere(graph: ir.Graph) -> None:
    """float16 initializers, value types and output_dtype attributes become float32."""
    for value in list(graph.initializers.values()):
        if value.dtype == ir.DataType.FLOAT16 and value.const_value is not None:
            array = value.const_value.numpy().astype(np.float32)
            value.const_value = ir.tensor(array, name=value.name)
    values = list(graph.inputs) + list(graph.initializers.values())
    for node in graph:
        values.extend(node.outputs)
        code = node.attributes.get_int("output_dtype", 0)
        if node.domain == GIE_DOMAIN and code == int(ir.DataType.FLOAT16):
            node.attributes["output_dtype"] = ir.AttrInt64("output_dtype", int(ir.DataType.FLOAT))
        fill = node.attributes.get("value")
        if node.op_type == "ConstantOfShape" and fill is not None:
            tensor = fill.as_tensor()
            if tensor.dtype == ir.DataType.FLOAT16:
                array = tensor.numpy().astype(np.float32)
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))
    for value in values:
        producer = value.producer()
        own_cast = producer is not None and producer.op_type == "Cast"
        if value.dtype == ir.DataType.FLOAT16 and not own_cast:
            value.type = ir.TensorType(ir.DataType.FLOAT)


# --------------------------------------------------------------------------- the export


def _is_qdq(node: ir.Node) -> bool:
    return node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain in ("", "ai.onnx")


def export_qdq(model: ir.Model) -> tuple[ir.Model, ExportReport]:
    """The engine model ``model`` (a plan.model) as a float32 + QDQ standard ONNX model.

    ``model`` is not modified. Raises :class:`ExportError` when an int8 layer's weights, bias or
    scales are not constants, and DecomposeError for a gie op with no standard form.
    """
    working = copy_model(model)
    graph = working.graph
    fp16_layers = sum(
        1
        for n in graph
        if n.metadata_props.get(PRECISION_KEY) == "fp16" and not _is_reformat_cast(n)
    )
    casts = [n for n in graph if _is_reformat_cast(n)]
    for node in casts:
        _bypass(graph, node)
    _float32_everywhere(graph)
    opset = max(working.opset_imports.get("", 1), 13)
    working.opset_imports[""] = opset
    names = taken_names(working)
    int8_layers = qdq_written = 0
    for node in list(graph):
        if node.domain == GIE_DOMAIN and node.op_type in INT8_WRITERS:
            qdq_written += _export_int8_layer(graph, node, names, opset)
            int8_layers += 1
    exported = decompose_gie_ops(working)
    report = ExportReport(
        int8_layers=int8_layers,
        qdq_written=qdq_written,
        qdq_total=sum(1 for n in exported.graph if _is_qdq(n)),
        fp16_layers=fp16_layers,
        casts_removed=len(casts),
    )
    return exported, report


__all__ = ["INT8_WRITERS", "ExportError", "ExportReport", "export_qdq"]
