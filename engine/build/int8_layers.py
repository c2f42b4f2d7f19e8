"""How an int8 precision decision becomes the inputs and attributes of a ``gie::Q*`` layer.

Per op (engine.ops.gie_quant gives the semantics):

* Conv / gie::ConvAct -> ``QConv(X_q, X_scale, W_q, W_scale, B_q, Residual, Y_scale)``: weights
  quantized per output channel (axis 0), the bias to int32 at ``X_scale * W_scale[c]``, the
  convolution and epilogue attributes kept;
* Gemm / MatMul with a constant 2-D weight / gie::GemmAct -> ``QGemm(...)`` with the same
  inputs; the weight's output-column axis is 0 for a transposed ``[N, K]`` weight (transB = 1),
  else 1; a scalar bias is broadcast to ``[N]``;
* MatMul of two activations -> ``QMatMul(A_q, A_scale, B_q, B_scale, Y_scale)``.

Weight scales come from the model's own Q/DQ nodes when it had them (explicit quantization)
and the axis matches, else ``max |w| / 127`` per channel. ``required`` tells the reformat pass
which inputs must arrive as int8 at which scale (and which may be any float).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from engine.build.precision import PrecisionDecision, qualified
from engine.ops.registry import Attrs
from engine.quantize.qparams import quantize, quantize_bias, weight_scales
from engine.quantize.scales import QuantScales

_CONV_ATTRS = ("group", "strides", "pads", "dilations", "kernel_shape", "auto_pad")
_EPILOGUE_ATTRS = ("activation", "activation_alpha", "min", "max", "residual_before_activation")
#: Where the output scale goes: after the six QConv/QGemm inputs, or the four of QMatMul.
_OUTPUT_SCALE_INDEX = {"QConv": 6, "QGemm": 6, "QMatMul": 4}

Constant = Callable[[str, np.ndarray], ir.Value]
ScaleValue = Callable[[float], ir.Value]


@dataclass
class Int8Layer:
    """The new node's ``inputs`` (None = omitted), ``attributes``, and ``required``: input
    index -> ("int8", scale) or ("float", None)."""

    inputs: list[ir.Value | None]
    attributes: dict[str, object]
    required: dict[int, tuple[str, float | None]]


def _constant_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value.numpy()


def channel_scales(
    scales: QuantScales, value: ir.Value | None, weight: np.ndarray, axis: int
) -> np.ndarray:
    """Per-channel weight scales along ``axis``: the model's own (Q/DQ) when they fit, else
    ``max |w| / 127``."""
    given = scales.weights.get(value.name or "") if value is not None else None
    if given is not None:
        values, given_axis = given
        if given_axis == axis and np.asarray(values).size == weight.shape[axis]:
            return np.asarray(values, dtype=np.float32).reshape(-1)
    return weight_scales(weight, axis=axis)


def int8_layer(
    node: ir.Node,
    decision: PrecisionDecision,
    output_dtype: ir.DataType,
    y_scale: float | None,
    scales: QuantScales,
    constant: Constant,
    scale_value: ScaleValue,
) -> Int8Layer:
    """The ``gie::{decision.int8_kind}`` layer replacing ``node`` (see the module docstring);
    ``constant(base_name, array)`` and ``scale_value(scale)`` make initializers."""
    op = qualified(node)
    attrs = Attrs.from_node(node)
    inputs = [*node.inputs, None, None, None, None]
    input_scales = dict(decision.input_scales)
    attributes: dict[str, object] = {"output_dtype": int(output_dtype)}
    new_inputs: list[ir.Value | None]
    if decision.int8_kind == "QMatMul":
        new_inputs = [
            inputs[0],
            scale_value(input_scales[0]),
            inputs[1],
            scale_value(input_scales[1]),
        ]
        required = {0: ("int8", input_scales[0]), 2: ("int8", input_scales[1])}
    else:
        weight = _constant_array(inputs[1])
        if weight is None:
            raise ValueError(f"layer {node.name}: int8 needs a constant weight")
        if decision.int8_kind == "QConv":
            axis, bias = 0, inputs[2]
            residual = inputs[3] if op == "gie::ConvAct" else None
            keep = _CONV_ATTRS + _EPILOGUE_ATTRS
        else:
            kind = {"Gemm": "Gemm", "MatMul": "MatMul"}.get(op) or attrs.str("kind", "Gemm")
            axis = 0 if kind == "Gemm" and attrs.int("transB", 0) else 1
            bias = inputs[2] if op != "MatMul" else None
            residual = inputs[3] if op == "gie::GemmAct" else None
            keep = ("transB", *_EPILOGUE_ATTRS)
            attributes["kind"] = kind or "Gemm"
        attributes.update({k: v.value for k, v in node.attributes.items() if k in keep})
        w_scales = channel_scales(scales, inputs[1], weight, axis)
        base = node.name or "layer"
        bias_array = _constant_array(bias)
        b_q = None
        if bias_array is not None:
            full = np.broadcast_to(bias_array.astype(np.float32).reshape(-1), (weight.shape[axis],))
            b_q = constant(f"{base}/bias_int32", quantize_bias(full, input_scales[0], w_scales))
        new_inputs = [
            inputs[0],
            scale_value(input_scales[0]),
            constant(f"{base}/weight_int8", quantize(weight, w_scales, axis=axis)),
            constant(f"{base}/weight_scale", w_scales.astype(np.float32)),
            b_q,
            residual,
        ]
        required = {0: ("int8", input_scales[0]), 5: ("float", None)}
    if y_scale is not None:
        at = _OUTPUT_SCALE_INDEX[decision.int8_kind]
        new_inputs += [None] * (at - len(new_inputs)) + [scale_value(y_scale)]
    while new_inputs and new_inputs[-1] is None:
        new_inputs.pop()
    return Int8Layer(new_inputs, attributes, required)


__all__ = ["Int8Layer", "channel_scales", "int8_layer"]
