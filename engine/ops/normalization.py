"""Normalizations: Batch/Instance/Layer/Group/RMS normalization, LRN, LpNormalization and MVN.

Statistics are computed in float32 (float64 inputs stay float64; LayerNormalization and friends
honour ``stash_type``) and results are cast back to the input dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx_ir import DataType

from engine.ops.common import _bytes, _numel, input_elements_cost, normalize_axis, same_as_input
from engine.ops.conv import compute_dtype
from engine.ops.registry import Attrs, KernelContext, KernelError, OpCost, OpSpec, TensorSpec


def _channel(v: np.ndarray, rank: int, dtype: np.dtype) -> np.ndarray:
    """Per-channel vector reshaped to broadcast against an (N, C, ...) tensor.

    A multi-dimensional parameter (BatchNormalization with ``spatial=0`` before opset 9) is
    per-activation and broadcasts as (1, C, D1, ...).
    """
    v = v.astype(dtype, copy=False)
    if v.ndim > 1:
        return v.reshape((1, *v.shape))
    return v.reshape((1, -1) + (1,) * (rank - 2))


def _stash(attrs: Attrs, x: np.ndarray) -> np.dtype:
    """Dtype statistics are computed in: stash_type (1 = float32 default), never below input."""
    if x.dtype == np.float64:
        return np.dtype(np.float64)
    stash = attrs.int("stash_type", 1)
    return np.dtype(np.float64) if stash == DataType.DOUBLE else np.dtype(np.float32)


# --------------------------------------------------------------------------- BatchNormalization


def _batch_norm(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """BatchNormalization: inference form, or batch statistics and running updates."""
    x, scale, bias, mean, var = inputs[:5]
    eps = attrs.float("epsilon", 1e-5)
    work = compute_dtype(x.dtype)
    xs = x.astype(work, copy=False)
    training = attrs.int("training_mode", 0) if ctx.opset >= 14 else 0
    if ctx.opset < 14 and ctx.output_count > 1 and not attrs.int("is_test", 0):
        training = 1  # before opset 14, asking for the statistics outputs means training
    if not training:
        factor = scale.astype(work) / np.sqrt(var.astype(work) + eps)
        shift = bias.astype(work) - mean.astype(work) * factor
        y = np.multiply(xs, _channel(factor, x.ndim, work))
        y += _channel(shift, x.ndim, work)
        return [y.astype(x.dtype, copy=False)]
    momentum = attrs.float("momentum", 0.9)
    axes = (0,) if scale.ndim > 1 else (0, *range(2, x.ndim))
    batch_mean = xs.mean(axis=axes)
    batch_var = xs.var(axis=axes)
    factor = scale.astype(work) / np.sqrt(batch_var + eps)
    y = (xs - _channel(batch_mean, x.ndim, work)) * _channel(factor, x.ndim, work)
    y = y + _channel(bias, x.ndim, work)
    running_mean = mean.astype(work) * momentum + batch_mean * (1 - momentum)
    running_var = var.astype(work) * momentum + batch_var * (1 - momentum)
    outs = [y, running_mean, running_var]
    if ctx.opset < 14:
        outs += [batch_mean, batch_var]
    return [o.astype(x.dtype, copy=False) for o in outs[: ctx.output_count]]


def _batch_norm_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list:
    """Y like X; the statistics outputs are per channel."""
    x = specs[0]
    channel = TensorSpec(specs[3].shape, x.dtype)
    return [TensorSpec(x.shape, x.dtype)] + [channel] * (ctx.output_count - 1)


# --------------------------------------------------------------------------- Instance / Group


def _normalize(xs: np.ndarray, axes: tuple[int, ...], eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) over ``axes``."""
    mean = xs.mean(axis=axes, keepdims=True)
    centered = xs - mean
    var = np.mean(np.square(centered), axis=axes, keepdims=True)
    return centered / np.sqrt(var + eps)


def _instance_norm(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """InstanceNormalization: per (n, c) statistics over the spatial axes."""
    x, scale, bias = inputs[:3]
    work = compute_dtype(x.dtype)
    y = _normalize(
        x.astype(work, copy=False), tuple(range(2, x.ndim)), attrs.float("epsilon", 1e-5)
    )
    y = y * _channel(scale, x.ndim, work) + _channel(bias, x.ndim, work)
    return [y.astype(x.dtype, copy=False)]


def _group_norm(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """GroupNormalization; opset-18 per-group or opset-21 per-channel scale and bias."""
    x, scale, bias = inputs[:3]
    groups = attrs.int("num_groups")
    n, c = x.shape[:2]
    if c % groups:
        raise KernelError(f"channels {c} not divisible by num_groups {groups}")
    work = _stash(attrs, x)
    grouped = x.astype(work).reshape(n, groups, -1)
    y = _normalize(grouped, (2,), attrs.float("epsilon", 1e-5)).reshape(x.shape)
    if scale.shape[0] == groups and groups != c:  # opset-18 form: one scale per group
        scale, bias = np.repeat(scale, c // groups), np.repeat(bias, c // groups)
    y = y.astype(compute_dtype(x.dtype), copy=False)
    y = y * _channel(scale, x.ndim, y.dtype) + _channel(bias, x.ndim, y.dtype)
    return [y.astype(x.dtype, copy=False)]


# --------------------------------------------------------------------------- Layer / RMS


def _affine(y: np.ndarray, scale: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """y * scale + bias, in place on ``y`` when the parameters do not grow its shape."""
    shapes = [y.shape, scale.shape] + ([] if bias is None else [bias.shape])
    if np.broadcast_shapes(*shapes) != y.shape:
        return y * scale if bias is None else y * scale + bias
    y *= scale
    if bias is not None:
        y += bias
    return y


def _layer_norm(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """LayerNormalization over axes [axis, rank), with optional Mean and InvStdDev."""
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = normalize_axis(attrs.int("axis", -1), x.ndim)
    work = _stash(attrs, x)
    xs = x.astype(work, copy=False)
    axes = tuple(range(axis, x.ndim))
    mean = xs.mean(axis=axes, keepdims=True)
    centered = xs - mean
    inv_std = 1.0 / np.sqrt(
        np.mean(np.square(centered), axis=axes, keepdims=True) + attrs.float("epsilon", 1e-5)
    )
    y = centered
    y *= inv_std
    if x.dtype != work:  # the spec rounds the normalized value to the input type first
        y = y.astype(x.dtype).astype(work)
    y = _affine(y, scale.astype(work, copy=False), None if bias is None else bias.astype(work))
    outs = [y.astype(x.dtype, copy=False), mean.astype(work), inv_std.astype(work)]
    return outs[: ctx.output_count]


def _layer_norm_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list:
    """Y like X; Mean/InvStdDev keep the leading dims, in the stash type."""
    x = specs[0]
    stash = DataType.DOUBLE if attrs.int("stash_type", 1) == DataType.DOUBLE else DataType.FLOAT
    if x.dtype == DataType.DOUBLE:
        stash = DataType.DOUBLE
    stat_shape = None
    if x.shape is not None:
        axis = normalize_axis(attrs.int("axis", -1), len(x.shape))
        stat_shape = tuple(x.shape[:axis]) + (1,) * (len(x.shape) - axis)
    outs = [TensorSpec(x.shape, x.dtype)] + [TensorSpec(stat_shape, stash)] * 2
    return outs[: max(ctx.output_count, 1)]


def _rms_norm(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """RMSNormalization: x / sqrt(mean(x^2) + eps) * scale over axes [axis, rank)."""
    x, scale = inputs[0], inputs[1]
    axis = normalize_axis(attrs.int("axis", -1), x.ndim)
    work = _stash(attrs, x)
    xs = x.astype(work, copy=False)
    mean_square = np.mean(np.square(xs), axis=tuple(range(axis, x.ndim)), keepdims=True)
    y = xs / np.sqrt(mean_square + attrs.float("epsilon", 1e-5))
    if x.dtype != work:  # the spec rounds the normalized value to the input type first
        y = y.astype(x.dtype).astype(work)
    y = _affine(y, scale.astype(work, copy=False), None)
    return [y.astype(x.dtype, copy=False)]


# --------------------------------------------------------------------------- LRN / Lp / MVN


def _lrn(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """LRN: x / (bias + alpha/size * sum of squares over neighbouring channels)^beta."""
    x = inputs[0]
    size = attrs.int("size")
    alpha, beta = attrs.float("alpha", 1e-4), attrs.float("beta", 0.75)
    bias = attrs.float("bias", 1.0)
    work = compute_dtype(x.dtype)
    sq = np.square(x.astype(work))
    before = (size - 1) // 2
    channels = x.shape[1]
    square_sum = sq.copy()
    for shift in range(-before, size - before):
        if shift == 0:
            continue
        lo, hi = max(0, -shift), min(channels, channels - shift)
        if lo < hi:
            square_sum[:, lo:hi] += sq[:, lo + shift : hi + shift]
    square_sum *= alpha / size
    square_sum += bias
    y = x.astype(work) * np.power(square_sum, -beta, out=square_sum)
    return [y.astype(x.dtype, copy=False)]


def _lp_norm(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """LpNormalization (p = 1 or 2) along ``axis``; zero vectors stay zero."""
    x = inputs[0]
    axis = normalize_axis(attrs.int("axis", -1), x.ndim)
    p = attrs.int("p", 2)
    work = compute_dtype(x.dtype)
    xs = x.astype(work, copy=False)
    if p == 1:
        norm = np.abs(xs).sum(axis=axis, keepdims=True)
    elif p == 2:
        norm = np.sqrt(np.square(xs).sum(axis=axis, keepdims=True))
    else:
        raise KernelError(f"LpNormalization supports p=1 or p=2, got {p}")
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(norm == 0, 0, xs / norm)
    return [y.astype(x.dtype, copy=False)]


def _mvn(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """MeanVarianceNormalization: (x - mean) / (std + 1e-9) over ``axes``."""
    x = inputs[0]
    axes = tuple(normalize_axis(a, x.ndim) for a in attrs.ints("axes", [0, 2, 3]))
    work = compute_dtype(x.dtype)
    xs = x.astype(work, copy=False)
    mean = xs.mean(axis=axes, keepdims=True)
    var = np.mean(np.square(xs), axis=axes, keepdims=True) - np.square(mean)
    y = (xs - mean) / (np.sqrt(np.maximum(var, 0)) + 1e-9)
    return [y.astype(x.dtype, copy=False)]


def _lrn_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """size + 6 operations per element."""
    return OpCost((attrs.int("size", 1) + 6) * _numel(ins[0]), _bytes(ins), _bytes(outs))


OPS: list[OpSpec] = [
    OpSpec(
        "BatchNormalization",
        _batch_norm,
        _batch_norm_shape,
        input_elements_cost(2),
        family="normalization",
    ),
    OpSpec(
        "InstanceNormalization",
        _instance_norm,
        same_as_input(0),
        input_elements_cost(8),
        family="normalization",
    ),
    OpSpec(
        "GroupNormalization",
        _group_norm,
        same_as_input(0),
        input_elements_cost(8),
        family="normalization",
    ),
    OpSpec(
        "LayerNormalization",
        _layer_norm,
        _layer_norm_shape,
        input_elements_cost(8),
        family="normalization",
    ),
    OpSpec(
        "RMSNormalization",
        _rms_norm,
        same_as_input(0),
        input_elements_cost(5),
        family="normalization",
    ),
    OpSpec("LRN", _lrn, same_as_input(0), _lrn_cost, family="normalization"),
    OpSpec(
        "LpNormalization",
        _lp_norm,
        same_as_input(0),
        input_elements_cost(3),
        family="normalization",
    ),
    OpSpec(
        "MeanVarianceNormalization",
        _mvn,
        same_as_input(0),
        input_elements_cost(7),
        family="normalization",
    ),
]
