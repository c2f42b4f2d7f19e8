"""Fused int8 layers of the engine: gie::QConv, gie::QGemm and gie::QMatMul.

This module is the reference semantics the CUDA backend matches bit for bit. Quantization is
symmetric int8 with zero point 0; the maths is :mod:`engine.quantize.qparams`.

gie::QConv(X_q, X_scale, W_q, W_scale, [B_q], [Residual], [Y_scale])
    X_q int8 (N, C, *S); X_scale float32 scalar; W_q int8 (M, C/group, *K); W_scale float32 [M];
    B_q int32 [M]; Residual float, broadcastable to the output; Y_scale float32 scalar.
    Conv attributes ``group``, ``strides``, ``pads`` (explicit), ``dilations``, ``kernel_shape``;
    the epilogue attributes of :mod:`engine.ops.gie_fused`; ``output_dtype``.
gie::QGemm(A_q, A_scale, B_q, B_scale, [C_q], [Residual], [Y_scale])
    ``kind`` = "Gemm" (``transA``, ``transB``; ``alpha`` = ``beta`` = 1 only; B_q is [K, N],
    or [N, K] with transB=1) or "MatMul" (A_q batched [..., K], B_q [K, N]). B_scale float32
    [N] and C_q int32 [N] apply along the output's last axis. Epilogue attributes and
    ``output_dtype`` as QConv.
gie::QMatMul(A_q, A_scale, B_q, B_scale, [Y_scale])
    Two int8 activations with per-tensor scales (attention's Q@K^T and P@V); NumPy matmul
    broadcasting; ``output_dtype``. No bias, no epilogue.

Computation, per output element with output channel c:

1. ``acc = sum(x_q * w_q)`` exactly (int8 products, integer sums; see ``qparams.int_matmul``),
   then ``acc = saturate_int32(acc + b_q[c])``.
2. ``combined = float32(x_scale) * float32(w_scale[c])`` (a float32 product).
3. ``real = float32(acc) * combined`` (float32).
4. ``real = epilogue(real, float32(residual))``: residual add and activation in the order
   ``residual_before_activation`` gives, all in float32 (``gie_fused.apply_epilogue``).
5. Output: ``output_dtype`` 1 (FLOAT) gives ``real``; 10 (FLOAT16) gives ``float16(real)``
   (round to nearest even); 3 (INT8) gives ``saturate_int8(rint(real / float32(y_scale)))``, a
   float32 division with ties to even. ``output_dtype`` defaults to INT8 when Y_scale is given
   and FLOAT otherwise; INT8 requires Y_scale (a Y_scale given with a float output is unused).

Costs count FLOPs as the float op does (2 per multiply-add, plus bias and epilogue) and bytes
with the operands' own widths (1 byte per int8 element).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.common import _bytes, _numel
from engine.ops.conv import _conv_cost, _conv_shape, window_attrs
from engine.ops.gie_fused import ACTIVATION_FLOPS, apply_epilogue
from engine.ops.linalg import _gemm_cost, _gemm_shape, _matmul_cost, _matmul_shape
from engine.ops.registry import (
    GIE_DOMAIN,
    Attrs,
    KernelContext,
    KernelError,
    OpCost,
    OpSpec,
    TensorSpec,
)
from engine.quantize import qparams

#: ONNX data types an int8 layer may produce.
OUTPUT_DTYPES: dict[int, np.dtype] = {
    int(ir.DataType.INT8): np.dtype(np.int8),
    int(ir.DataType.FLOAT): np.dtype(np.float32),
    int(ir.DataType.FLOAT16): np.dtype(np.float16),
}


def _optional(inputs: list[Any], index: int) -> Any:
    return inputs[index] if len(inputs) > index else None


def output_dtype(attrs: Attrs, has_y_scale: bool) -> ir.DataType:
    """The layer's output type: the ``output_dtype`` attribute, by default INT8 when a Y_scale
    input is present and FLOAT otherwise. INT8 without Y_scale is refused."""
    default = int(ir.DataType.INT8) if has_y_scale else int(ir.DataType.FLOAT)
    code = attrs.int("output_dtype", default)
    if code not in OUTPUT_DTYPES:
        raise KernelError(f"output_dtype must be INT8 (3), FLOAT (1) or FLOAT16 (10), not {code}")
    if code == int(ir.DataType.INT8) and not has_y_scale:
        raise KernelError("output_dtype INT8 requires the Y_scale input")
    return ir.DataType(code)


def _require_int8(name: str, array: Any) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.dtype != np.int8:
        dtype = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise KernelError(f"{name} must be an int8 tensor, got {dtype}")
    return array


def _scalar_scale(name: str, value: Any) -> np.float32:
    scale = np.asarray(value)
    if scale.size != 1:
        raise KernelError(f"{name} must be a per-tensor (scalar) scale, got shape {scale.shape}")
    return np.float32(scale.reshape(()))


def _channel_scales(name: str, value: Any, channels: int) -> np.ndarray:
    scales = np.asarray(value, dtype=np.float32).reshape(-1)
    if scales.size == 1:
        return np.full(channels, scales[0], dtype=np.float32)
    if scales.size != channels:
        raise KernelError(f"{name} has {scales.size} scales for {channels} output channels")
    return scales


def _finish(
    acc: np.ndarray,
    combined: np.ndarray | np.float32,
    channel_axis: int | None,
    residual: Any,
    y_scale: Any,
    attrs: Attrs,
    epilogue: bool = True,
) -> np.ndarray:
    """Steps 3-5 of the module docstring: float32 real value, epilogue, output conversion."""
    target = output_dtype(attrs, y_scale is not None)
    real = qparams.accumulator_to_real(acc, combined, channel_axis)
    if epilogue:
        if residual is not None and np.asarray(residual).dtype.kind != "f":
            raise KernelError(f"Residual must be a float tensor, got {np.asarray(residual).dtype}")
        real = apply_epilogue(real, None if residual is None else np.asarray(residual), attrs)
    if target == ir.DataType.INT8:
        return qparams.quantize(real, _scalar_scale("Y_scale", y_scale))
    return real.astype(OUTPUT_DTYPES[int(target)], copy=False)


def _spec_dtype_check(name: str, spec: TensorSpec | None) -> None:
    if spec is not None and spec.dtype is not None and spec.dtype != ir.DataType.INT8:
        raise KernelError(f"{name} must be INT8, got {spec.dtype.name}")


def _epilogue_flops(out: TensorSpec, attrs: Attrs, residual: bool) -> int:
    per_element = ACTIVATION_FLOPS.get(attrs.str("activation", "") or "", 0) + int(residual)
    return per_element * _numel(out)


def _present(ins: list[TensorSpec | None], index: int) -> bool:
    return len(ins) > index and ins[index] is not None


# --------------------------------------------------------------------------- QConv


def _qconv(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """Exact int8 convolution, int32 bias, float32 requantization, epilogue, output type."""
    x_q = _require_int8("QConv input X_q", inputs[0])
    w_q = _require_int8("QConv weight W_q", inputs[2])
    x_scale = _scalar_scale("X_scale", inputs[1])
    w_scale = _channel_scales("W_scale", inputs[3], w_q.shape[0])
    bias, residual, y_scale = _optional(inputs, 4), _optional(inputs, 5), _optional(inputs, 6)
    kernel, strides, dilations, pads, auto_pad = window_attrs(attrs, x_q.ndim - 2, w_q.shape[2:])
    if list(w_q.shape[2:]) != list(kernel):
        raise KernelError(f"kernel_shape {kernel} differs from weight shape {w_q.shape}")
    try:
        acc = qparams.int_conv(
            x_q,
            w_q,
            group=attrs.int("group", 1),
            strides=strides,
            pads=pads,
            dilations=dilations,
            auto_pad=auto_pad,
        )
    except qparams.QuantizationError as error:
        raise KernelError(str(error)) from error
    acc = qparams.add_bias(acc, bias, channel_axis=1)
    combined = qparams.combined_scale(x_scale, w_scale)
    return [_finish(acc, combined, 1, residual, y_scale, attrs)]


def _qconv_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """Conv's output shape from X_q and W_q; dtype from ``output_dtype``."""
    _spec_dtype_check("QConv input X_q", specs[0])
    y_scale = _present(specs, 6)
    shape = _conv_shape([specs[0], specs[2]], attrs, ctx)[0].shape
    return [TensorSpec(shape, output_dtype(attrs, y_scale))]


def _qconv_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """Conv FLOPs, bias add and epilogue; bytes of the int8/int32/float operands and output."""
    flops = _conv_cost([ins[0], ins[2]], outs, attrs).flops
    flops += _numel(outs[0]) * int(_present(ins, 4))
    flops += _epilogue_flops(outs[0], attrs, _present(ins, 5))
    return OpCost(flops, _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- QGemm


def _is_matmul(attrs: Attrs) -> bool:
    kind = attrs.str("kind", "Gemm") or "Gemm"
    if kind not in ("Gemm", "MatMul"):
        raise KernelError(f"QGemm kind must be 'Gemm' or 'MatMul', not {kind!r}")
    if kind == "Gemm" and (attrs.float("alpha", 1.0) != 1.0 or attrs.float("beta", 1.0) != 1.0):
        raise KernelError("QGemm supports alpha = beta = 1 only (fold them into the scales)")
    return kind == "MatMul"


def _qgemm(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """Exact int8 Gemm / batched MatMul, int32 bias on the last axis, requantize, epilogue."""
    a_q = _require_int8("QGemm input A_q", inputs[0])
    b_q = _require_int8("QGemm weight B_q", inputs[2])
    a_scale = _scalar_scale("A_scale", inputs[1])
    bias, residual, y_scale = _optional(inputs, 4), _optional(inputs, 5), _optional(inputs, 6)
    if _is_matmul(attrs):
        if b_q.ndim != 2 or a_q.ndim < 1 or a_q.shape[-1] != b_q.shape[0]:
            raise KernelError(f"QGemm MatMul operands {a_q.shape} and {b_q.shape} do not multiply")
    else:
        a_q = a_q.T if attrs.int("transA", 0) else a_q
        b_q = b_q.T if attrs.int("transB", 0) else b_q
        if a_q.ndim != 2 or b_q.ndim != 2 or a_q.shape[1] != b_q.shape[0]:
            raise KernelError(f"QGemm operands {a_q.shape} and {b_q.shape} do not multiply")
    channels = b_q.shape[1]
    b_scale = _channel_scales("B_scale", inputs[3], channels)
    try:
        acc = qparams.int_matmul(a_q, b_q)
    except qparams.QuantizationError as error:
        raise KernelError(str(error)) from error
    acc = qparams.add_bias(acc, bias, channel_axis=-1)
    combined = qparams.combined_scale(a_scale, b_scale)
    return [_finish(acc, combined, -1, residual, y_scale, attrs)]


def _qgemm_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """Gemm's (M, N) or the batched MatMul shape; dtype from ``output_dtype``."""
    _spec_dtype_check("QGemm input A_q", specs[0])
    rule = _matmul_shape if _is_matmul(attrs) else _gemm_shape
    shape = rule([specs[0], specs[2]], attrs, ctx)[0].shape
    return [TensorSpec(shape, output_dtype(attrs, _present(specs, 6)))]


def _qgemm_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """2*K FLOPs per output, the bias add and the epilogue; bytes of operands and output."""
    if _is_matmul(attrs):
        flops = _matmul_cost([ins[0], ins[2]], outs, attrs).flops
    else:  # Gemm's cost without its alpha/beta epilogue (both are 1 here)
        flops = _gemm_cost([ins[0], ins[2]], outs, attrs).flops - 2 * _numel(outs[0])
    flops += _numel(outs[0]) * int(_present(ins, 4))
    flops += _epilogue_flops(outs[0], attrs, _present(ins, 5))
    return OpCost(flops, _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- QMatMul


def _qmatmul(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """Exact int8 batched matmul of two activations, requantized with a_scale * b_scale."""
    a_q = _require_int8("QMatMul input A_q", inputs[0])
    b_q = _require_int8("QMatMul input B_q", inputs[2])
    combined = qparams.combined_scale(
        _scalar_scale("A_scale", inputs[1]), _scalar_scale("B_scale", inputs[3])
    )
    try:
        acc = qparams.int_matmul(a_q, b_q)
    except ValueError as error:  # qparams refusals and NumPy shape mismatches
        raise KernelError(f"QMatMul operands {a_q.shape} and {b_q.shape}: {error}") from error
    return [_finish(acc, combined, None, None, _optional(inputs, 4), attrs, epilogue=False)]


def _qmatmul_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """NumPy matmul shape of A_q and B_q; dtype from ``output_dtype``."""
    _spec_dtype_check("QMatMul input A_q", specs[0])
    _spec_dtype_check("QMatMul input B_q", specs[2])
    shape = _matmul_shape([specs[0], specs[2]], attrs, ctx)[0].shape
    return [TensorSpec(shape, output_dtype(attrs, _present(specs, 4)))]


def _qmatmul_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """2*K FLOPs per output; bytes of the int8 operands, scales and output."""
    flops = _matmul_cost([ins[0], ins[2]], outs, attrs).flops
    return OpCost(flops, _bytes(ins), _bytes(outs))


OPS: list[OpSpec] = [
    OpSpec("QConv", _qconv, _qconv_shape, _qconv_cost, domain=GIE_DOMAIN, family="conv"),
    OpSpec("QGemm", _qgemm, _qgemm_shape, _qgemm_cost, domain=GIE_DOMAIN, family="linalg"),
    OpSpec("QMatMul", _qmatmul, _qmatmul_shape, _qmatmul_cost, domain=GIE_DOMAIN, family="linalg"),
]

__all__ = ["OPS", "OUTPUT_DTYPES", "output_dtype"]
