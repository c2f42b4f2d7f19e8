"""Quantization ops: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear and the integer
kernels QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger.

Scales are real-valued (units: real value per quantization step); zero points are in the
quantized type. Rounding is round-half-to-even and integer results saturate to the target range.
Low-precision types (int4/uint4/int2/uint2, float8, float4) are ml_dtypes arrays.
"""

from __future__ import annotations

import itertools
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from engine.ops.common import _bytes, broadcast_dims, input_elements_cost, normalize_axis
from engine.ops.registry import (
    Attrs,
    KernelContext,
    KernelError,
    OpCost,
    OpSpec,
    TensorSpec,
    dtype_of_array,
)

FAMILY = "quantization"

#: Integer quantized types and their saturation ranges (inclusive).
_INT_RANGES: dict[ir.DataType, tuple[int, int]] = {
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT16: (-32768, 32767),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
    ir.DataType.UINT4: (0, 15),
    ir.DataType.INT4: (-8, 7),
    ir.DataType.UINT2: (0, 3),
    ir.DataType.INT2: (-2, 1),
}
_FLOAT8 = {
    ir.DataType.FLOAT8E4M3FN,
    ir.DataType.FLOAT8E4M3FNUZ,
    ir.DataType.FLOAT8E5M2,
    ir.DataType.FLOAT8E5M2FNUZ,
}


def _broadcast_param(
    value: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int
) -> np.ndarray:
    """Reshape a scale/zero point (scalar, per-axis 1-D or blocked) to broadcast over ``shape``."""
    if value.ndim == 0 or (value.size == 1 and not block_size):
        return value.reshape(())
    axis = normalize_axis(axis, len(shape))
    if not block_size:
        if value.ndim != 1 or value.size != shape[axis]:
            raise KernelError(
                f"per-axis parameter of shape {value.shape} does not match axis {axis} "
                f"of input shape {shape}"
            )
        dims = [1] * len(shape)
        dims[axis] = value.size
        return value.reshape(dims)
    if block_size < 0:
        raise KernelError(f"block_size must be positive, got {block_size}")
    value = np.repeat(value, block_size, axis=axis)
    value = value.take(np.arange(shape[axis]), axis=axis)
    if value.shape != tuple(shape):
        raise KernelError(f"blocked parameter shape {value.shape} does not fit input {shape}")
    return value


def _quantize_output_type(zero_point: Any, attrs: Attrs) -> ir.DataType:
    if zero_point is not None:
        return (
            zero_point.dtype if isinstance(zero_point, TensorSpec) else dtype_of_array(zero_point)
        )
    output_dtype = attrs.int("output_dtype", 0)
    return ir.DataType(output_dtype) if output_dtype else ir.DataType.UINT8


def _saturate_float(values: np.ndarray, target: np.dtype) -> np.ndarray:
    """Cast to a float8 type, clamping finite overflow and infinities to the largest finite."""
    largest = float(ml_dtypes.finfo(target).max)
    clipped = np.where(np.isnan(values), values, np.clip(values, -largest, largest))
    return clipped.astype(target)


def _quantize_linear(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """y = saturate(round_half_even(x / scale) + zero_point) in the zero point's type
    (else ``output_dtype``, else uint8); float8 targets optionally saturate to the finite range."""
    x, scale = inputs[0], inputs[1]
    zero_point = inputs[2] if len(inputs) > 2 else None
    target = _quantize_output_type(zero_point, attrs)
    axis, block = attrs.int("axis", 1), attrs.int("block_size", 0)
    scale = _broadcast_param(scale, x.shape, axis, block)
    precision = attrs.int("precision", 0)
    if precision:
        work = ir.DataType(precision).numpy()
        scaled = x.astype(work) / scale.astype(work)
    else:
        scaled = x / scale
    np_target = target.numpy()
    if target in _INT_RANGES:
        low, high = _INT_RANGES[target]
        result = np.rint(scaled.astype(np.float64))
        if zero_point is not None:
            result = result + _broadcast_param(zero_point, x.shape, axis, block).astype(np.int64)
        return [np.clip(result, low, high).astype(np.int64).astype(np_target)]
    if target in _FLOAT8:
        scaled = scaled.astype(np.float32)
        if attrs.int("saturate", 1):
            return [_saturate_float(scaled, np_target)]
        return [scaled.astype(np_target)]
    if target in (ir.DataType.FLOAT4E2M1, ir.DataType.FLOAT6E2M3, ir.DataType.FLOAT6E3M2):
        if zero_point is not None:
            zp = _broadcast_param(zero_point, x.shape, axis, block).astype(np.float32)
            scaled = scaled + zp
        return [scaled.astype(np.float32).astype(np_target)]
    raise KernelError(f"QuantizeLinear cannot produce {target.name}")


def _dequantize_linear(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """y = (x - zero_point) * scale, computed in float32, returned in the scale's dtype (or
    ``output_dtype``); scale/zero point are per-tensor, per-axis or blocked."""
    x, scale = inputs[0], inputs[1]
    zero_point = inputs[2] if len(inputs) > 2 else None
    axis, block = attrs.int("axis", 1), attrs.int("block_size", 0)
    x_type = dtype_of_array(x)
    values = x.astype(np.float32)
    if zero_point is not None and x_type not in _FLOAT8 and x_type != ir.DataType.FLOAT4E2M1:
        if dtype_of_array(zero_point) != x_type:
            raise KernelError(
                f"zero point dtype {zero_point.dtype} differs from input dtype {x.dtype}"
            )
        values = values - _broadcast_param(zero_point, x.shape, axis, block).astype(np.float32)
    result = values * _broadcast_param(scale, x.shape, axis, block)
    output_dtype = attrs.int("output_dtype", 0)
    target = ir.DataType(output_dtype).numpy() if output_dtype else scale.dtype
    return [result.astype(target)]


def _dynamic_quantize_linear(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """uint8 quantization with scale/zero point chosen so [min(x, 0), max(x, 0)] maps to 0..255."""
    x = inputs[0]
    high = np.float32(max(0.0, float(np.max(x)) if x.size else 0.0))
    low = np.float32(min(0.0, float(np.min(x)) if x.size else 0.0))
    scale = np.float32(1.0 if high == low else high - low) / np.float32(255)
    zero = np.rint(np.clip(np.float32(0) - low / scale, 0, 255))
    y = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.uint8)
    return [y, np.array(scale, dtype=x.dtype), np.array(zero, dtype=np.uint8)]


# --------------------------------------------------------------------------- integer conv/matmul


def _conv_geometry(
    in_spatial: tuple[int, ...], kernel: tuple[int, ...], attrs: Attrs
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Strides, dilations, begin pads and end pads (elements) of an N-d convolution."""
    rank = len(kernel)
    strides = attrs.ints("strides") or [1] * rank
    dilations = attrs.ints("dilations") or [1] * rank
    pads = attrs.ints("pads") or [0] * (2 * rank)
    begin, end = list(pads[:rank]), list(pads[rank:])
    auto_pad = attrs.str("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i in range(rank):
            out = -(-in_spatial[i] // strides[i])
            total = max(
                0, (out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - in_spatial[i]
            )
            small, large = total // 2, total - total // 2
            begin[i], end[i] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        begin, end = [0] * rank, [0] * rank
    return strides, dilations, begin, end


def _conv_nd(x: np.ndarray, w: np.ndarray, attrs: Attrs) -> np.ndarray:
    """Grouped N-d cross-correlation of x (N, C, *S) with w (M, C/group, *K), exact in int64."""
    group = attrs.int("group", 1)
    kernel = tuple(w.shape[2:])
    strides, dilations, begin, end = _conv_geometry(tuple(x.shape[2:]), kernel, attrs)
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begin, end, strict=True)])
    out = [
        (padded.shape[2 + i] - dilations[i] * (k - 1) - 1) // strides[i] + 1
        for i, k in enumerate(kernel)
    ]
    n, c = x.shape[:2]
    m, cg = w.shape[:2]
    if c != cg * group or m % group:
        raise KernelError(f"channels {c}/{m} do not fit weight {w.shape} with group {group}")
    xg = padded.reshape(n, group, cg, *padded.shape[2:])
    wg = w.reshape(group, m // group, cg, *kernel)
    result = np.zeros((n, group, m // group, *out), dtype=np.int64)
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = tuple(
            slice(o * d, o * d + (size - 1) * s + 1, s)
            for o, d, s, size in zip(offset, dilations, strides, out, strict=True)
        )
        patch = xg[(slice(None),) * 3 + window]
        result += np.einsum("ngc...,gmc->ngm...", patch, wg[(..., *offset)])
    return result.reshape(n, m, *out)


def _as_int(value: np.ndarray, zero_point: Any, per_axis: int | None = None) -> np.ndarray:
    """Widen to int64 and subtract a (scalar or per-``per_axis``) zero point."""
    result = value.astype(np.int64)
    if zero_point is None:
        return result
    zp = np.asarray(zero_point).astype(np.int64)
    if zp.size > 1 and per_axis is not None:
        shape = [1] * value.ndim
        shape[per_axis] = zp.size
        zp = zp.reshape(shape)
    elif zp.size == 1:
        zp = zp.reshape(())
    return result - zp


def _requantize(acc: np.ndarray, multiplier: Any, zero_point: Any, dtype: np.dtype) -> list[Any]:
    """Scale int accumulators to the output grid, add the zero point, round and saturate."""
    values = acc * multiplier
    if zero_point is not None:
        values = values + np.asarray(zero_point).astype(np.float64).reshape(())
    info = np.iinfo(dtype)
    return [np.clip(np.rint(values), info.min, info.max).astype(dtype)]


def _conv_integer(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """int32 convolution of zero-point-shifted integer inputs (no rescaling)."""
    x, w = inputs[0], inputs[1]
    x_zp = inputs[2] if len(inputs) > 2 else None
    w_zp = inputs[3] if len(inputs) > 3 else None
    acc = _conv_nd(_as_int(x, x_zp), _as_int(w, w_zp, 0), attrs)
    return [acc.astype(np.int32)]


def _qlinear_conv(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Quantized convolution: int accumulate (+ int32 bias), rescale by x_scale*w_scale/y_scale."""
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp = inputs[:8]
    bias = inputs[8] if len(inputs) > 8 else None
    acc = _conv_nd(_as_int(x, x_zp), _as_int(w, w_zp, 0), attrs)
    if bias is not None:
        acc = acc + bias.astype(np.int64).reshape((1, -1) + (1,) * (acc.ndim - 2))
    w_scale = np.asarray(w_scale)
    if w_scale.size > 1:
        w_scale = w_scale.reshape((1, -1) + (1,) * (acc.ndim - 2))
    multiplier = (x_scale * w_scale / y_scale).astype(np.float64)
    dtype = y_zp.dtype if y_zp is not None else x.dtype
    return _requantize(acc, multiplier, y_zp, dtype)


def _matmul_integer(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """int32 matmul of (A - a_zero_point per row) and (B - b_zero_point per column)."""
    a, b = inputs[0], inputs[1]
    a_zp = inputs[2] if len(inputs) > 2 else None
    b_zp = inputs[3] if len(inputs) > 3 else None
    a_int = _as_int(a, a_zp, a.ndim - 2 if a.ndim >= 2 else None)
    b_int = _as_int(b, b_zp, b.ndim - 1)
    return [np.matmul(a_int, b_int).astype(np.int32)]


def _qlinear_matmul(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Quantized matmul: int accumulate, rescale by a_scale*b_scale/y_scale, add y_zero_point."""
    a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp = inputs[:8]
    acc = np.matmul(_as_int(a, a_zp, a.ndim - 2), _as_int(b, b_zp, b.ndim - 1))
    multiplier = np.asarray(a_scale * b_scale / y_scale)
    dtype = y_zp.dtype if y_zp is not None else a.dtype
    return _requantize(acc, multiplier.astype(np.float64), y_zp, dtype)


# --------------------------------------------------------------------------- shape and cost rules


def _quantize_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    zero_point = specs[2] if len(specs) > 2 else None
    return [TensorSpec(specs[0].shape, _quantize_output_type(zero_point, attrs))]


def _dequantize_shape(
    specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext
) -> list[TensorSpec]:
    output_dtype = attrs.int("output_dtype", 0)
    return [
        TensorSpec(specs[0].shape, ir.DataType(output_dtype) if output_dtype else specs[1].dtype)
    ]


def _dynamic_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    return [
        TensorSpec(specs[0].shape, ir.DataType.UINT8),
        TensorSpec((), specs[0].dtype),
        TensorSpec((), ir.DataType.UINT8),
    ]


def _conv_shape_for(x_index: int, w_index: int, dtype_of: Any) -> Any:
    def rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
        x, w = specs[x_index], specs[w_index]
        dtype = dtype_of(specs)
        if x.shape is None or w.shape is None:
            return [TensorSpec(None, dtype)]
        spatial = x.shape[2:]
        kernel = w.shape[2:]
        if not all(isinstance(d, int) for d in (*spatial, *kernel)):
            return [TensorSpec((x.shape[0], w.shape[0]) + (None,) * len(spatial), dtype)]
        strides, dilations, begin, end = _conv_geometry(spatial, kernel, attrs)  # type: ignore[arg-type]
        out = tuple(
            (s + b + e - d * (k - 1) - 1) // st + 1
            for s, k, st, d, b, e in zip(
                spatial, kernel, strides, dilations, begin, end, strict=True
            )
        )
        return [TensorSpec((x.shape[0], w.shape[0], *out), dtype)]

    return rule


def _matmul_shape_for(dtype_of: Any, b_index: int) -> Any:
    def rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
        a, b = specs[0], specs[b_index]
        dtype = dtype_of(specs)
        if a.shape is None or b.shape is None or len(a.shape) < 2 or len(b.shape) < 2:
            return [TensorSpec(None, dtype)]
        batch = broadcast_dims([a.shape[:-2], b.shape[:-2]])
        return [TensorSpec((*batch, a.shape[-2], b.shape[-1]), dtype)]

    return rule


def _int32(specs: list[TensorSpec]) -> ir.DataType:
    return ir.DataType.INT32


def _y_zero_point_type(specs: list[TensorSpec]) -> ir.DataType | None:
    return specs[7].dtype if len(specs) > 7 and specs[7] is not None else specs[0].dtype


def _conv_cost_for(w_index: int) -> Any:
    def cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
        w, out = ins[w_index], outs[0]
        flops = 0
        if w.is_static and out.is_static:
            flops = 2 * out.numel() * int(np.prod(w.shape[1:]))  # type: ignore[index]
        return OpCost(flops, _bytes(ins), _bytes(outs))

    return cost


def _matmul_cost_for(a_index: int) -> Any:
    def cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
        a, out = ins[a_index], outs[0]
        flops = 2 * out.numel() * int(a.shape[-1]) if a.is_static and out.is_static else 0  # type: ignore[index]
        return OpCost(flops, _bytes(ins), _bytes(outs))

    return cost


OPS: list[OpSpec] = [
    OpSpec(
        "QuantizeLinear", _quantize_linear, _quantize_shape, input_elements_cost(3), family=FAMILY
    ),
    OpSpec(
        "DequantizeLinear",
        _dequantize_linear,
        _dequantize_shape,
        input_elements_cost(2),
        family=FAMILY,
    ),
    OpSpec(
        "DynamicQuantizeLinear",
        _dynamic_quantize_linear,
        _dynamic_shape,
        input_elements_cost(5),
        family=FAMILY,
    ),
    OpSpec(
        "ConvInteger",
        _conv_integer,
        _conv_shape_for(0, 1, _int32),
        _conv_cost_for(1),
        family=FAMILY,
    ),
    OpSpec(
        "QLinearConv",
        _qlinear_conv,
        _conv_shape_for(0, 3, _y_zero_point_type),
        _conv_cost_for(3),
        family=FAMILY,
    ),
    OpSpec(
        "MatMulInteger",
        _matmul_integer,
        _matmul_shape_for(_int32, 1),
        _matmul_cost_for(0),
        family=FAMILY,
    ),
    OpSpec(
        "QLinearMatMul",
        _qlinear_matmul,
        _matmul_shape_for(_y_zero_point_type, 3),
        _matmul_cost_for(0),
        family=FAMILY,
    ),
]
