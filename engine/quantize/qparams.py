"""The maths of the engine's int8 contract: scales, quantization, exact integer cores, requantize.

Quantization is symmetric int8 with zero point 0. A *threshold* is the absolute real value that
maps to 127; ``scale = max(threshold, 1e-8) / 127`` (real units per quantization step).
Activations carry one float32 scale per tensor; weights one float32 scale per output channel
(``max|w_c| / 127``).

Rounding rules (the reference semantics the CUDA backend matches bit for bit):

* quantize: ``q = saturate_int8(rint(float32(x) / float32(scale)))``, a float32 division,
  round half to even, saturation to [-128, 127] (exactly ONNX QuantizeLinear with zero point 0;
  NaN becomes 0, as in the ONNX reference kernel);
* bias: ``b_q = saturate_int32(rint(float64(b) / (float64(x_scale) * float64(w_scale_c))))``;
* integer core: ``acc = sum(x_q * w_q) + b_q`` computed exactly (see :func:`int_matmul`),
  saturated to int32;
* requantize: ``real = float32(acc) * (float32(x_scale) * float32(w_scale_c))`` in float32, then
  the epilogue in float32, then either a cast to the output float type or :func:`quantize` with
  the output scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from engine.ops.conv import window_geometry, windows

INT8_MIN, INT8_MAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: Smallest threshold used for a scale: a zero threshold (all-zero tensor or channel) gets
#: ``MIN_THRESHOLD / 127`` instead of a zero scale, so quantizing never divides by zero.
MIN_THRESHOLD = 1e-8
#: Largest reduction depth K whose int8 dot products always fit int32:
#: K * 128 * 128 <= 2**31 - 1.
MAX_INT32_DEPTH = (2**31 - 1) // (128 * 128)
#: Largest im2col buffer (bytes, float64) built at once; bigger batches go in chunks.
IM2COL_BYTES = 128 << 20


class QuantizationError(ValueError):
    """Quantization parameters or operands that the int8 contract refuses."""


# --------------------------------------------------------------------------- scales


def scale_from_threshold(threshold: float | np.ndarray) -> np.float32 | np.ndarray:
    """float32 scale ``max(threshold, 1e-8) / 127`` (float32 division) for a threshold.

    A scalar threshold gives an ``np.float32``; an array gives a float32 array of scales.
    Negative, NaN or infinite thresholds are refused.
    """
    values = np.asarray(threshold, dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise QuantizationError(f"threshold must be finite and >= 0, got {threshold!r}")
    clamped = np.maximum(values, MIN_THRESHOLD).astype(np.float32)
    scales = clamped / np.float32(INT8_MAX)
    return np.float32(scales) if scales.ndim == 0 else scales


def weight_scales(w: np.ndarray, axis: int = 0) -> np.ndarray:
    """Per-channel float32 scales ``max|w_c| / 127`` along ``axis`` (the output channels).

    Conv weights [M, C/g, *k] use axis 0; a Gemm/MatMul weight [K, N] uses axis 1 (transB=1
    weights [N, K] use axis 0). All-zero channels get the tiny scale ``1e-8 / 127``.
    """
    w = np.asarray(w)
    if w.ndim == 0:
        raise QuantizationError("weight must have at least one axis")
    axis = axis % w.ndim
    values = w.astype(np.float32, copy=False)
    if not np.all(np.isfinite(values)):
        raise QuantizationError("weight contains NaN or infinite values; cannot quantize")
    others = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(values), axis=others) if values.size else np.zeros(w.shape[axis])
    return np.asarray(scale_from_threshold(amax), dtype=np.float32).reshape(w.shape[axis])


def _broadcast_scale(scale: np.ndarray | float, ndim: int, axis: int | None) -> np.ndarray:
    """The float32 scale shaped to broadcast over an ``ndim`` array along ``axis``."""
    scale = np.asarray(scale, dtype=np.float32)
    if axis is None or scale.size == 1:
        if scale.size != 1:
            raise QuantizationError(f"per-tensor scale must be a scalar, got shape {scale.shape}")
        return scale.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = scale.size
    return scale.reshape(shape)


# --------------------------------------------------------------------------- (de)quantize


def quantize(x: np.ndarray, scale: np.ndarray | float, axis: int | None = None) -> np.ndarray:
    """int8 ``saturate(rint(float32(x) / scale))``: ONNX QuantizeLinear with zero point 0.

    ``scale`` is a float32 scalar, or a 1-D per-channel array applied along ``axis``. The division
    is float32; ties round to even; NaN gives 0; values beyond the range saturate.
    """
    values = np.asarray(x).astype(np.float32, copy=False)
    scaled = values / _broadcast_scale(scale, values.ndim, axis)
    rounded = np.nan_to_num(np.rint(scaled), nan=0.0, posinf=INT8_MAX, neginf=INT8_MIN)
    return np.clip(rounded, INT8_MIN, INT8_MAX).astype(np.int8)


def dequantize(q: np.ndarray, scale: np.ndarray | float, axis: int | None = None) -> np.ndarray:
    """float32 ``float32(q) * scale`` (ONNX DequantizeLinear with zero point 0)."""
    values = np.asarray(q).astype(np.float32)
    return values * _broadcast_scale(scale, values.ndim, axis)


def quantize_weight(w: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 per-channel scales along ``axis``) by :func:`weight_scales`."""
    scales = weight_scales(w, axis)
    return quantize(w, scales, axis), scales


def quantize_bias(
    b: np.ndarray, x_scale: np.ndarray | float, w_scales: np.ndarray | float
) -> np.ndarray:
    """int32 bias ``saturate(rint(float64(b) / (float64(x_scale) * float64(w_scale_c))))``.

    The bias lives on the accumulator grid (units ``x_scale * w_scale_c``), so it is added to the
    int32 accumulator before requantization. ``w_scales`` is [C] matching ``b`` (or a scalar).
    """
    bias = np.asarray(b, dtype=np.float64)
    x64 = np.float64(np.asarray(x_scale, dtype=np.float32).reshape(()))
    w64 = np.asarray(w_scales, dtype=np.float32).astype(np.float64)
    if w64.size != 1 and w64.shape != bias.shape:
        raise QuantizationError(f"bias shape {bias.shape} does not match scales {w64.shape}")
    if not np.all(np.isfinite(bias)):
        raise QuantizationError("bias contains NaN or infinite values; cannot quantize")
    per_channel = w64 if w64.size != 1 else w64.reshape(())
    rounded = np.rint(bias / (x64 * per_channel))
    return np.clip(rounded, INT32_MIN, INT32_MAX).astype(np.int32)


# --------------------------------------------------------------------------- requantize


def combined_scale(x_scale: np.ndarray | float, w_scale: np.ndarray | float) -> np.ndarray:
    """float32 product ``float32(x_scale) * float32(w_scale)`` (per channel when w_scale is 1-D):
    the real value of one accumulator unit."""
    x32 = np.asarray(x_scale, dtype=np.float32).reshape(())
    return x32 * np.asarray(w_scale, dtype=np.float32)


def add_bias(acc: np.ndarray, bias_q: np.ndarray | None, channel_axis: int) -> np.ndarray:
    """int32 ``saturate(acc + b_q)`` with the [C] bias broadcast along ``channel_axis``.

    The sum is formed in int64, so it is exact before the saturation.
    """
    if bias_q is None:
        return acc.astype(np.int32, copy=False)
    bias = np.asarray(bias_q).astype(np.int64)
    if bias.size != 1:
        shape = [1] * acc.ndim
        shape[channel_axis % acc.ndim] = bias.size
        bias = bias.reshape(shape)
    total = acc.astype(np.int64) + bias
    return np.clip(total, INT32_MIN, INT32_MAX).astype(np.int32)


def accumulator_to_real(
    acc: np.ndarray, combined: np.ndarray | float, channel_axis: int | None = None
) -> np.ndarray:
    """float32 ``float32(acc) * combined``; a 1-D ``combined`` applies along ``channel_axis``.

    ``float32(acc)`` rounds accumulators beyond 2**24 to nearest even, as a GPU's int-to-float
    conversion does.
    """
    values = np.asarray(acc).astype(np.float32)
    return values * _broadcast_scale(combined, values.ndim, channel_axis)


def requantize(
    acc: np.ndarray,
    combined: np.ndarray | float,
    y_scale: np.ndarray | float,
    channel_axis: int | None = None,
) -> np.ndarray:
    """int8 output of an int32 accumulator with no epilogue:
    ``quantize(float32(acc) * combined, y_scale)``."""
    return quantize(accumulator_to_real(acc, combined, channel_axis), y_scale)


# --------------------------------------------------------------------------- exact integer cores


def _check_int8(name: str, array: np.ndarray) -> None:
    if np.asarray(array).dtype != np.int8:
        raise QuantizationError(f"{name} must be int8, got {np.asarray(array).dtype}")


def _check_depth(depth: int) -> None:
    if depth > MAX_INT32_DEPTH:
        raise QuantizationError(
            f"reduction depth {depth} exceeds {MAX_INT32_DEPTH}: int8 dot products could "
            "overflow the int32 accumulator"
        )


def int_matmul(a_q: np.ndarray, b_q: np.ndarray) -> np.ndarray:
    """Exact int32 ``a_q @ b_q`` of int8 operands (NumPy matmul broadcasting and 1-D rules).

    Computed as a float64 matmul: every product is an integer of magnitude <= 2**14 and every
    partial sum an integer of magnitude <= K * 2**14 < 2**53, so each float64 addition is exact
    whatever order or blocking BLAS uses. K is limited to :data:`MAX_INT32_DEPTH` so the result
    fits int32.
    """
    _check_int8("matmul operand A", a_q)
    _check_int8("matmul operand B", b_q)
    _check_depth(int(a_q.shape[-1]))
    product = np.matmul(a_q.astype(np.float64), b_q.astype(np.float64))
    return np.asarray(product).astype(np.int32)


def int_conv(
    x_q: np.ndarray,
    w_q: np.ndarray,
    *,
    group: int = 1,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    auto_pad: str = "NOTSET",
) -> np.ndarray:
    """Exact int32 N-D convolution of int8 x (N, C, *S) with int8 w (M, C/group, *K).

    Geometry as ONNX Conv (pads [begin..., end...]); zero padding is the int8 value 0. Grouped and
    depthwise (group = C) convolutions included. Computed as im2col + one batched float64 GEMM
    over the groups (exact for the reason given in :func:`int_matmul`), in batch chunks.
    """
    _check_int8("convolution input X", x_q)
    _check_int8("convolution weight W", w_q)
    spatial = x_q.ndim - 2
    kernel = list(w_q.shape[2:])
    strides = list(strides) if strides else [1] * spatial
    dilations = list(dilations) if dilations else [1] * spatial
    n, channels, filters = x_q.shape[0], x_q.shape[1], w_q.shape[0]
    if group < 1 or channels != w_q.shape[1] * group or filters % group:
        raise QuantizationError(
            f"input channels {channels} / weight {w_q.shape} do not match group {group}"
        )
    out, begins, ends = window_geometry(x_q.shape[2:], kernel, strides, dilations, pads, auto_pad)
    out = [int(o) for o in out]  # type: ignore[arg-type]
    cg, mg, ksize, npix = channels // group, filters // group, math.prod(kernel), math.prod(out)
    _check_depth(cg * ksize)
    weights = w_q.astype(np.float64).reshape(group, mg, cg * ksize)
    per_image = max(channels * ksize * npix * 8, 1)
    chunk = max(1, IM2COL_BYTES // per_image)
    parts = []
    for start in range(0, n, chunk):
        part = x_q[start : start + chunk].astype(np.float64)
        view = windows(part, kernel, strides, dilations, begins, ends, out)
        view = view.reshape(part.shape[0], group, cg, *out, *kernel)
        order = (1, 2, *range(3 + spatial, 3 + 2 * spatial), 0, *range(3, 3 + spatial))
        cols = view.transpose(order).reshape(group, cg * ksize, -1)  # (g, cg*K, n*pix)
        result = np.matmul(weights, cols).reshape(filters, part.shape[0], *out)
        parts.append(result.swapaxes(0, 1))
    result = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return np.ascontiguousarray(result).astype(np.int32)


__all__ = [
    "INT8_MAX",
    "INT8_MIN",
    "MAX_INT32_DEPTH",
    "MIN_THRESHOLD",
    "QuantizationError",
    "accumulator_to_real",
    "add_bias",
    "combined_scale",
    "dequantize",
    "int_conv",
    "int_matmul",
    "quantize",
    "quantize_bias",
    "quantize_weight",
    "requantize",
    "scale_from_threshold",
    "weight_scales",
]
