"""Resampling: Resize (and the old Upsample), GridSample, AffineGrid and CenterCropPad.

Resize is separable: each resized axis gets a dense (out, in) weight matrix built from the
interpolation taps (linear, cubic, antialiased variants, exclude_outside, edge clamping) and is
contracted with ``tensordot``; nearest mode gathers instead. GridSample gathers every tap
combination for all output points at once.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from engine.ops.common import _bytes, _numel, declared_rule, normalize_axis
from engine.ops.registry import Attrs, KernelContext, KernelError, OpCost, OpSpec, TensorSpec

# --------------------------------------------------------------------------- Resize geometry


def _source_coords(
    mode: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float] | None
) -> np.ndarray:
    """Input coordinate of every output index along one axis."""
    y = np.arange(out_len, dtype=np.float64)
    out_width = scale * in_len
    if mode == "align_corners":
        return np.zeros(out_len) if out_width == 1 else y * (in_len - 1) / (out_width - 1)
    if mode == "asymmetric":
        return y / scale
    if mode == "tf_crop_and_resize":
        lo, hi = roi if roi is not None else (0.0, 1.0)
        if out_width == 1:
            x = np.full(out_len, (hi - lo) * (in_len - 1) / 2)
        else:
            x = y * (hi - lo) * (in_len - 1) / (out_width - 1)
        return x + lo * (in_len - 1)
    if mode == "pytorch_half_pixel":
        return np.full(out_len, -0.5) if out_width == 1 else (y + 0.5) / scale - 0.5
    if mode == "half_pixel":
        return (y + 0.5) / scale - 0.5
    if mode == "tf_half_pixel_for_nn":  # opsets 11-12
        return (y + 0.5) / scale
    if mode == "half_pixel_symmetric":
        offset = in_len / 2 * (1 - out_len / out_width)
        return offset + (y + 0.5) / scale - 0.5
    raise KernelError(f"unknown coordinate_transformation_mode '{mode}'")


def _cubic(d: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution kernel with coefficient ``a``."""
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _weights(
    x: np.ndarray, in_len: int, scale: float, mode: str, attrs: Attrs, antialias: bool
) -> np.ndarray:
    """Dense (out, in) interpolation matrix for linear or cubic mode."""
    base = np.ceil(x) - 1  # floor, except integers map to x - 1 (ratio in (0, 1])
    ratio = x - base
    shrink = min(scale, 1.0) if antialias else 1.0
    if mode == "linear":
        start = int(np.floor(-1 / shrink) + 1) if antialias else 0
        offsets = np.arange(start, 2 - start)
        coeffs = np.clip(1 - np.abs((offsets[None] - ratio[:, None]) * shrink), 0, 1)
    else:
        a = attrs.float("cubic_coeff_a", -0.75)
        start = int(np.floor(-2 / shrink) + 1) if antialias else -1
        offsets = np.arange(start, 2 - start)
        coeffs = _cubic((offsets[None] - ratio[:, None]) * shrink, a)
    if antialias:
        coeffs = coeffs / coeffs.sum(axis=1, keepdims=True)
    idx = base[:, None].astype(np.int64) + offsets[None]
    if attrs.int("exclude_outside", 0):
        coeffs = np.where((idx < 0) | (idx >= in_len), 0.0, coeffs)
        total = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(total == 0, 1.0, total)
    matrix = np.zeros((len(x), in_len))
    rows = np.broadcast_to(np.arange(len(x))[:, None], idx.shape)
    np.add.at(matrix, (rows, np.clip(idx, 0, in_len - 1)), coeffs)
    return matrix


def _nearest_index(x: np.ndarray, in_len: int, nearest: str, scale: float) -> np.ndarray:
    floor = np.floor(x)
    frac = x - floor
    if nearest == "floor":
        index = floor
    elif nearest == "ceil":
        index = np.ceil(x)
    elif nearest == "round_prefer_ceil":
        index = floor + (frac >= 0.5)
    elif nearest == "simple":  # opset <= 10: floor when upsampling, ceil when downsampling
        index = np.ceil(x) if scale < 1 else floor
    else:
        index = floor + (frac > 0.5)
    return np.clip(index, 0, in_len - 1).astype(np.int64)


def _resize_plan(
    shape: tuple[int, ...], scales: Any, sizes: Any, attrs: Attrs
) -> tuple[list[float], list[int], list[int]]:
    """(per-axis scales, output shape, resized axes) from the scales or sizes input."""
    rank = len(shape)
    axes = [normalize_axis(a, rank) for a in (attrs.ints("axes") or range(rank))]
    factor = [1.0] * rank
    out = list(shape)
    if sizes is not None and np.size(sizes):
        for axis, size in zip(axes, np.asarray(sizes).reshape(-1), strict=True):
            out[axis] = int(size)
            factor[axis] = int(size) / shape[axis]
        policy = attrs.str("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            common = pick(factor[a] for a in axes)
            for axis in axes:
                factor[axis] = common
                out[axis] = int(common * shape[axis] + 0.5)
    elif scales is not None and np.size(scales):
        for axis, scale in zip(axes, np.asarray(scales, dtype=np.float64).reshape(-1), strict=True):
            factor[axis] = float(scale)
            out[axis] = int(np.floor(scale * shape[axis]))
    else:
        raise KernelError("Resize needs either scales or sizes")
    return factor, out, axes


def resample(
    x: np.ndarray,
    factor: list[float],
    out: list[int],
    axes: list[int],
    attrs: Attrs,
    opset: int,
    roi: Any = None,
) -> np.ndarray:
    """Resize ``x`` along ``axes`` to ``out`` with the scale factors ``factor``."""
    mode = attrs.str("mode", "nearest")
    mode = {"bilinear": "linear", "trilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    default_ct = "half_pixel" if opset >= 11 else "asymmetric"
    transform = attrs.str("coordinate_transformation_mode", default_ct)
    nearest = attrs.str("nearest_mode", "round_prefer_floor") if opset >= 11 else "simple"
    antialias = bool(attrs.int("antialias", 0)) and mode != "nearest"
    extrapolation = attrs.float("extrapolation_value", 0.0)
    rank = x.ndim
    full_roi = None
    if roi is not None and np.size(roi):
        values = np.asarray(roi, dtype=np.float64).reshape(-1)
        full_roi = [(0.0, 1.0)] * rank
        for i, axis in enumerate(axes if len(values) == 2 * len(axes) else range(rank)):
            full_roi[axis] = (values[i], values[i + len(values) // 2])
    floating = x.dtype.kind == "f" and x.dtype != np.float16
    result = x if floating or mode == "nearest" else x.astype(np.float32)
    for axis in axes:
        axis_roi = full_roi[axis] if full_roi is not None else None
        trivial = axis_roi is None or (np.isclose(axis_roi[0], 0) and np.isclose(axis_roi[1], 1))
        if np.isclose(factor[axis], 1.0) and out[axis] == x.shape[axis] and trivial:
            continue
        coords = _source_coords(transform, out[axis], x.shape[axis], factor[axis], axis_roi)
        if mode == "nearest":
            index = _nearest_index(coords, x.shape[axis], nearest, factor[axis])
            result = np.take(result, index, axis=axis)
        elif mode in ("linear", "cubic"):
            shrinking = antialias and factor[axis] < 1
            matrix = _weights(coords, x.shape[axis], factor[axis], mode, attrs, shrinking)
            matrix = matrix.astype(result.dtype if result.dtype.kind == "f" else np.float32)
            result = np.moveaxis(np.tensordot(result, matrix, axes=([axis], [1])), -1, axis)
        else:
            raise KernelError(f"unknown Resize mode '{mode}'")
        if transform == "tf_crop_and_resize":
            outside = (coords < 0) | (coords > x.shape[axis] - 1)
            if outside.any():
                shape = [1] * rank
                shape[axis] = out[axis]
                result = np.where(outside.reshape(shape), extrapolation, result)
    if x.dtype.kind in "iu" and result.dtype != x.dtype:
        info = np.iinfo(x.dtype)
        result = np.clip(np.rint(result), info.min, info.max)
    return np.ascontiguousarray(result).astype(x.dtype, copy=False)


def _resize(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """Resize (opsets 10-19): roi, scales or sizes, and every mode the spec defines."""
    x = inputs[0]
    if ctx.opset < 11:
        roi, scales, sizes = None, inputs[1], None
    else:
        roi = inputs[1] if len(inputs) > 1 else None
        scales = inputs[2] if len(inputs) > 2 else None
        sizes = inputs[3] if len(inputs) > 3 else None
    factor, out, axes = _resize_plan(x.shape, scales, sizes, attrs)
    return [resample(x, factor, out, axes, attrs, ctx.opset, roi)]


def _upsample(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """Upsample (opsets 7-9): nearest or linear, asymmetric coordinates."""
    x = inputs[0]
    if len(inputs) > 1 and inputs[1] is not None:
        scales = np.asarray(inputs[1], dtype=np.float64)
    elif "scales" in attrs:
        scales = np.asarray(attrs.floats("scales"))
    else:
        scales = np.ones(x.ndim)
        scales[-2:] = [attrs.float("height_scale", 1.0), attrs.float("width_scale", 1.0)]
    axes = list(range(x.ndim))
    out = [int(np.floor(s * d)) for s, d in zip(scales, x.shape, strict=True)]
    return [resample(x, list(scales), out, axes, attrs, 10)]


def _resize_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """Output dims from constant scales/sizes, else the declared shape."""
    x = specs[0]
    given = [s.value if s is not None else None for s in specs[1:]]
    if ctx.opset < 11:
        scales, sizes = (given[0] if given else None), None
    else:
        scales = given[1] if len(given) > 1 else None
        sizes = given[2] if len(given) > 2 else None
    if x.is_static and (scales is not None or sizes is not None):
        try:
            _, out, _ = _resize_plan(x.shape, scales, sizes, attrs)  # type: ignore[arg-type]
            return [TensorSpec(tuple(out), x.dtype)]
        except KernelError:
            pass
    declared = declared_rule(specs, attrs, ctx)
    return declared or [TensorSpec(None if x.shape is None else (None,) * len(x.shape), x.dtype)]


def _resize_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """Taps per output element by mode."""
    taps = {"nearest": 0, "linear": 4, "cubic": 8}.get(attrs.str("mode", "nearest") or "", 4)
    rank = len(ins[0].shape or ())
    return OpCost(taps * max(rank - 2, 1) * _numel(outs[0]), _bytes(ins[:1]), _bytes(outs))


# --------------------------------------------------------------------------- GridSample


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect coordinates into [lo, hi] (GridSample reflection padding)."""
    span = hi - lo
    if span <= 0:
        return np.full_like(x, lo)
    below, above = x < lo, x > hi
    d = np.where(below, lo - x, x - hi)
    n = np.floor(d / span)
    r = d - n * span
    even = n % 2 == 0
    low_side = np.where(even, lo + r, hi - r)
    high_side = np.where(even, hi - r, lo + r)
    return np.where(below, low_side, np.where(above, high_side, x))


def _grid_sample(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """GridSample (opsets 16/20): N-D nearest/linear/cubic with zeros/border/reflection."""
    x, grid = inputs[0], inputs[1]
    mode = attrs.str("mode", "linear" if ctx.opset >= 20 else "bilinear")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    padding = attrs.str("padding_mode", "zeros")
    align = bool(attrs.int("align_corners", 0))
    n, c = x.shape[:2]
    dims = x.shape[2:]
    spatial = len(dims)
    out_spatial = grid.shape[1:-1]
    g = grid.reshape(n, -1, spatial).astype(np.float64)[..., ::-1]
    taps_per_dim = []
    for d, size in enumerate(dims):
        v = g[..., d]
        v = (v + 1) / 2 * (size - 1) if align else ((v + 1) * size - 1) / 2
        lo, hi = (0.0, size - 1.0) if align else (-0.5, size - 0.5)
        if mode == "nearest":
            v = np.rint(v)
        if padding == "border" and mode != "cubic":  # cubic clamps each tap (as onnxruntime)
            v = np.where((v < lo) | (v > hi), np.clip(v, 0, size - 1), v)
        elif padding == "reflection":
            v = _reflect(v, lo, hi)
        if mode == "nearest":
            idx, weights = [np.trunc(v)], [np.ones_like(v)]
        else:
            base = np.floor(v)
            t = v - base
            if mode == "linear":
                idx, weights = [base, base + 1], [1 - t, t]
            else:
                offsets = [-1, 0, 1, 2]
                idx = [base + o for o in offsets]
                weights = [_cubic(t - o, -0.75) for o in offsets]
        fixed = []
        for i, w in zip(idx, weights, strict=True):
            valid = (i >= 0) & (i < size)
            if padding == "zeros":
                w = np.where(valid, w, 0.0)
            elif padding == "border":
                i = np.clip(i, 0, size - 1)
            else:
                i = np.where(valid, i, np.trunc(_reflect(i, lo, hi)))
            fixed.append((np.clip(i, 0, size - 1).astype(np.int64), w))
        taps_per_dim.append(fixed)
    work = np.float64 if x.dtype == np.float64 else np.float32
    # Channels-last copy so that every gathered point reads one contiguous row of C values.
    data = np.moveaxis(x.astype(work, copy=False), 1, -1).reshape(n, -1, c)
    strides = np.cumprod((1, *dims[::-1]))[:-1][::-1]
    batch = np.arange(n)[:, None]
    result = np.zeros((n, g.shape[1], c), dtype=work)
    for combo in itertools.product(*taps_per_dim):
        weight = np.prod([w for _, w in combo], axis=0)
        flat = sum(i * int(st) for (i, _), st in zip(combo, strides, strict=True))
        result += data[batch, flat] * weight[..., None].astype(work)
    result = result.transpose(0, 2, 1).reshape(n, c, *out_spatial)
    return [result.astype(x.dtype, copy=False)]


def _grid_sample_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list:
    """(N, C, *grid spatial dims)."""
    x, grid = specs[0], specs[1]
    if x.shape is None or grid.shape is None:
        return [TensorSpec(None, x.dtype)]
    return [TensorSpec((x.shape[0], x.shape[1], *grid.shape[1:-1]), x.dtype)]


# --------------------------------------------------------------------------- AffineGrid


def _affine_grid(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """AffineGrid: theta applied to the normalized base grid of ``size``."""
    theta, size = inputs[0], [int(v) for v in inputs[1]]
    align = bool(attrs.int("align_corners", 0))
    spatial = size[2:]
    axes = []
    for length in spatial:
        if align:
            axes.append(np.linspace(-1.0, 1.0, length) if length > 1 else np.zeros(1))
        else:
            axes.append((2 * np.arange(length) + 1) / length - 1)
    mesh = np.meshgrid(*axes, indexing="ij")
    homo = np.stack([*mesh[::-1], np.ones(spatial)], axis=-1).reshape(-1, len(spatial) + 1)
    grid = np.einsum("pk,nik->npi", homo, theta.astype(np.float64))
    return [grid.reshape(size[0], *spatial, len(spatial)).astype(theta.dtype)]


def _affine_grid_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list:
    """(N, *spatial, rank) from the constant size input."""
    size = specs[1].value
    if size is None:
        return declared_rule(specs, attrs, ctx)
    dims = [int(v) for v in size]
    return [TensorSpec((dims[0], *dims[2:], len(dims) - 2), specs[0].dtype)]


# --------------------------------------------------------------------------- CenterCropPad


def _center_crop_pad(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """CenterCropPad: centered crop or zero pad of each listed axis."""
    x, shape = inputs[0], [int(v) for v in inputs[1]]
    axes = [normalize_axis(a, x.ndim) for a in (attrs.ints("axes") or range(x.ndim))]
    out_shape = list(x.shape)
    src = [slice(None)] * x.ndim
    dst = [slice(None)] * x.ndim
    for axis, target in zip(axes, shape, strict=True):
        size = x.shape[axis]
        out_shape[axis] = target
        if target < size:
            start = (size - target) // 2
            src[axis] = slice(start, start + target)
        elif target > size:
            start = (target - size) // 2
            dst[axis] = slice(start, start + size)
    result = np.zeros(out_shape, dtype=x.dtype)
    result[tuple(dst)] = x[tuple(src)]
    return [result]


def _center_crop_pad_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list:
    """The input shape with the listed axes replaced by ``shape``."""
    x, shape = specs[0], specs[1].value
    if x.shape is None or shape is None:
        return declared_rule(specs, attrs, ctx)
    out = list(x.shape)
    axes = [normalize_axis(a, len(out)) for a in (attrs.ints("axes") or range(len(out)))]
    for axis, target in zip(axes, shape, strict=True):
        out[axis] = int(target)
    return [TensorSpec(tuple(out), x.dtype)]


def _gather_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """About eight operations per output element."""
    return OpCost(8 * _numel(outs[0]), _bytes(ins), _bytes(outs))


OPS: list[OpSpec] = [
    OpSpec("Resize", _resize, _resize_shape, _resize_cost, family="resize"),
    OpSpec("Upsample", _upsample, _resize_shape, _resize_cost, family="resize"),
    OpSpec("GridSample", _grid_sample, _grid_sample_shape, _gather_cost, family="resize"),
    OpSpec("AffineGrid", _affine_grid, _affine_grid_shape, _gather_cost, family="resize"),
    OpSpec(
        "CenterCropPad", _center_crop_pad, _center_crop_pad_shape, _gather_cost, family="resize"
    ),
]
