"""Pooling: Max/Average/Lp pools (windowed and global), MaxUnpool, MaxRoiPool and RoiAlign.

Windowed pools reduce a strided sliding-window view of the padded input (see
:func:`engine.ops.conv.windows`); the window counts that AveragePool divides by are computed once
from a mask of the input's spatial extent.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from onnx_ir import DataType

from engine.ops.common import _bytes, _numel, declared_rule
from engine.ops.conv import compute_dtype, pad_input, window_attrs, window_geometry, windows
from engine.ops.registry import Attrs, KernelContext, OpCost, OpSpec, TensorSpec

# --------------------------------------------------------------------------- geometry


def _geometry(
    x_shape: tuple, attrs: Attrs
) -> tuple[list, list[int], list[int], list[int], list[int], list[int]]:
    """(out, begins, ends, kernel, strides, dilations) for a windowed pool on input ``x_shape``."""
    spatial = len(x_shape) - 2
    kernel, strides, dilations, pads, auto_pad = window_attrs(attrs, spatial)
    ceil = bool(attrs.int("ceil_mode", 0))
    out, begins, ends = window_geometry(
        x_shape[2:], kernel, strides, dilations, pads, auto_pad, ceil
    )
    return out, begins, ends, kernel, strides, dilations


def _pool_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """(N, C, *out) of a windowed pool; MaxPool's Indices output is int64."""
    x = specs[0]
    if x.shape is None:
        return [TensorSpec(None, x.dtype)] * max(ctx.output_count, 1)
    out = _geometry(x.shape, attrs)[0]
    result = [TensorSpec((*x.shape[:2], *out), x.dtype)]
    if ctx.output_count > 1:
        result.append(TensorSpec((*x.shape[:2], *out), DataType.INT64))
    return result


def _window_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """One operation per window element per output."""
    kernel = attrs.ints("kernel_shape") or [1]
    return OpCost(int(np.prod(kernel)) * _numel(outs[0]), _bytes(ins), _bytes(outs))


def _pool(x: np.ndarray, geometry: tuple, how: str, fill: float = 0.0) -> np.ndarray:
    """Max or sum pooling of x (N, C, *S), one spatial axis at a time (both are separable).

    Each axis reduces its kernel taps as whole-array strided slices, which is much faster than
    NumPy reductions over short window axes.
    """
    out, begins, ends, kernel, strides, dilations = geometry
    if any(o <= 0 for o in out):
        return np.zeros((*x.shape[:2], *[max(o, 0) for o in out]), dtype=x.dtype)
    result = pad_input(x, begins, ends, fill)
    combine = np.maximum if how == "max" else np.add
    for i, (size, step, dilation) in enumerate(zip(kernel, strides, dilations, strict=True)):
        lead = (slice(None),) * (2 + i)
        span = (out[i] - 1) * step + 1
        taps = [
            result[(*lead, slice(k * dilation, k * dilation + span, step))] for k in range(size)
        ]
        reduced = np.array(taps[0])
        for tap in taps[1:]:
            combine(reduced, tap, out=reduced)
        result = reduced
    return result


# --------------------------------------------------------------------------- MaxPool


def _max_pool(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """MaxPool with optional Indices (flat input offsets, row- or column-major)."""
    x = inputs[0]
    spatial = x.ndim - 2
    out, begins, ends, kernel, strides, dilations = _geometry(x.shape, attrs)
    fill = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf
    geometry = (out, begins, ends, kernel, strides, dilations)
    if ctx.output_count < 2:
        return [_pool(x, geometry, "max", fill)]
    view = windows(x, kernel, strides, dilations, begins, ends, out, fill=fill)
    flat = view.reshape(*view.shape[: 2 + spatial], -1)
    arg = flat.argmax(axis=-1)
    result = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    offsets = np.unravel_index(arg, kernel)
    coords = []
    for i in range(spatial):
        shape = [1] * (2 + spatial)
        shape[2 + i] = out[i]
        start = (np.arange(out[i]) * strides[i] - begins[i]).reshape(shape)
        coords.append(start + offsets[i] * dilations[i])
    n, c = x.shape[:2]
    sizes = x.shape[2:]
    if attrs.int("storage_order", 0):
        coords, sizes = coords[::-1], sizes[::-1]
    index = np.arange(n * c).reshape(n, c, *[1] * spatial).astype(np.int64)
    for coord, size in zip(coords, sizes, strict=False):
        index = index * size + coord
    return [result, index.astype(np.int64)]


# --------------------------------------------------------------------------- Average / Lp


def _counts(shape: tuple, attrs: Attrs, geometry: tuple) -> np.ndarray:
    """Per-output-window element counts (1, 1, *out) AveragePool divides by."""
    out, begins, ends, kernel, strides, dilations = geometry
    spatial = len(shape) - 2
    auto_pad = attrs.str("auto_pad", "NOTSET") or "NOTSET"
    mask = np.ones((1, 1, *shape[2:]), dtype=np.float32)
    if attrs.int("count_include_pad", 0):
        pads = attrs.ints("pads") or [0] * (2 * spatial)
        declared = ends if auto_pad != "NOTSET" else pads[spatial:]
        extra = [e - d for e, d in zip(ends, declared, strict=False)]
        mask = np.pad(
            mask,
            [(0, 0), (0, 0)] + [(b, d) for b, d in zip(begins, declared, strict=False)],
            constant_values=1,
        )
        return _pool(mask, (out, [0] * spatial, extra, kernel, strides, dilations), "sum")
    return _pool(mask, geometry, "sum")


def _average_pool(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """AveragePool dividing by the in-input (or in-padded-input) window size."""
    x = inputs[0]
    geometry = _geometry(x.shape, attrs)
    work = compute_dtype(x.dtype)
    total = _pool(x.astype(work, copy=False), geometry, "sum")
    counts = _counts(x.shape, attrs, geometry).astype(work)
    return [(total / np.maximum(counts, 1)).astype(x.dtype, copy=False)]


def _lp_pool(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """LpPool: (sum |x|^p over the window)^(1/p), padding counts as zero."""
    x = inputs[0]
    p = attrs.float("p", 2.0)
    work = compute_dtype(x.dtype)
    powered = np.abs(x.astype(work)) ** p
    total = _pool(powered, _geometry(x.shape, attrs), "sum")
    return [(total ** (1.0 / p)).astype(x.dtype, copy=False)]


# --------------------------------------------------------------------------- global pools


def _global(how: str) -> Any:
    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
        x = inputs[0]
        axes = tuple(range(2, x.ndim))
        if how == "max":
            return [x.max(axis=axes, keepdims=True)]
        work = compute_dtype(x.dtype)
        if how == "avg":
            result = x.astype(work, copy=False).mean(axis=axes, keepdims=True)
        else:
            p = attrs.float("p", 2.0)
            result = (np.abs(x.astype(work)) ** p).sum(axis=axes, keepdims=True) ** (1.0 / p)
        return [result.astype(x.dtype, copy=False)]

    return kernel


def _global_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """(N, C, 1, ..., 1)."""
    x = specs[0]
    if x.shape is None:
        return [TensorSpec(None, x.dtype)]
    return [TensorSpec((*x.shape[:2], *[1] * (len(x.shape) - 2)), x.dtype)]


def _global_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """One operation per input element."""
    return OpCost(_numel(ins[0]), _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- MaxUnpool


def _unpool_out(x_shape: tuple, attrs: Attrs) -> list:
    """Default MaxUnpool spatial dims: (in - 1) * stride + kernel - pads."""
    spatial = len(x_shape) - 2
    kernel, strides, _, pads, _ = window_attrs(attrs, spatial)
    pads = pads or [0] * (2 * spatial)
    return [
        (d - 1) * strides[i] + kernel[i] - pads[i] - pads[i + spatial]
        if isinstance(d, int)
        else None
        for i, d in enumerate(x_shape[2:])
    ]


def _max_unpool(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """MaxUnpool: scatter values to their indices; output_shape pads the result."""
    x, indices = inputs[0], inputs[1]
    shape_in = inputs[2] if len(inputs) > 2 else None
    inferred = [*x.shape[:2], *_unpool_out(x.shape, attrs)]
    scattered = np.zeros(int(np.prod(inferred)), dtype=x.dtype)
    scattered[indices.reshape(-1)] = x.reshape(-1)
    scattered = scattered.reshape(inferred)
    if shape_in is None:
        return [scattered]
    result = np.zeros([int(v) for v in shape_in], dtype=x.dtype)
    region = tuple(slice(0, min(a, b)) for a, b in zip(inferred, result.shape, strict=True))
    result[region] = scattered[region]
    return [result]


def _max_unpool_shape(
    specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext
) -> list[TensorSpec]:
    """Inferred dims, or the constant output_shape input."""
    x = specs[0]
    if len(specs) > 2 and specs[2] is not None:
        if specs[2].value is not None:
            return [TensorSpec(tuple(int(v) for v in specs[2].value), x.dtype)]
        return declared_rule(specs, attrs, ctx)
    if x.shape is None:
        return [TensorSpec(None, x.dtype)]
    return [TensorSpec((*x.shape[:2], *_unpool_out(x.shape, attrs)), x.dtype)]


# --------------------------------------------------------------------------- ROI pools


def _max_roi_pool(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """MaxRoiPool: max over the quantized bins of each [batch, x1, y1, x2, y2] ROI."""
    x, rois = inputs[0], inputs[1]
    ph, pw = attrs.ints("pooled_shape") or [1, 1]
    scale = attrs.float("spatial_scale", 1.0)
    height, width = x.shape[2:]
    result = np.zeros((rois.shape[0], x.shape[1], ph, pw), dtype=x.dtype)
    for r, roi in enumerate(rois):
        batch = int(roi[0])
        x1, y1, x2, y2 = (round(float(v) * scale) for v in roi[1:5])
        bin_h = max(y2 - y1 + 1, 1) / ph
        bin_w = max(x2 - x1 + 1, 1) / pw
        for i in range(ph):
            hs = min(max(math.floor(i * bin_h) + y1, 0), height)
            he = min(max(math.ceil((i + 1) * bin_h) + y1, 0), height)
            for j in range(pw):
                ws = min(max(math.floor(j * bin_w) + x1, 0), width)
                we = min(max(math.ceil((j + 1) * bin_w) + x1, 0), width)
                if he > hs and we > ws:
                    result[r, :, i, j] = x[batch, :, hs:he, ws:we].max(axis=(1, 2))
    return [result]


def _roi_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """(num_rois, C, out_h, out_w)."""
    x, rois = specs[0], specs[1]
    if attrs.ints("pooled_shape"):
        ph, pw = attrs.ints("pooled_shape")
    else:
        ph, pw = attrs.int("output_height", 1), attrs.int("output_width", 1)
    channels = x.shape[1] if x.shape is not None else None
    count = rois.shape[0] if rois.shape is not None else None
    return [TensorSpec((count, channels, ph, pw), x.dtype)]


def _axis_samples(start: float, size: float, pooled: int, grid: int, limit: int) -> tuple:
    """Bilinear taps along one axis for RoiAlign: (low, high, w_low, w_high, valid) per sample."""
    bin_size = size / pooled
    pos = start + np.arange(pooled)[:, None] * bin_size + (np.arange(grid) + 0.5) * bin_size / grid
    pos = pos.reshape(-1)
    valid = (pos >= -1.0) & (pos <= limit)
    pos = np.maximum(pos, 0.0)
    low = pos.astype(np.int64)
    at_edge = low >= limit - 1
    low = np.where(at_edge, limit - 1, low)
    high = np.where(at_edge, limit - 1, low + 1)
    pos = np.where(at_edge, low, pos)
    frac = pos - low
    return low, high, (1.0 - frac) * valid, frac * valid


def _roi_align(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """RoiAlign (avg or max over bilinear samples), opset-10 and opset-16 coordinates."""
    x, rois, batch_indices = inputs[0], inputs[1], inputs[2]
    out_h, out_w = attrs.int("output_height", 1), attrs.int("output_width", 1)
    ratio = attrs.int("sampling_ratio", 0)
    scale = attrs.float("spatial_scale", 1.0)
    mode = attrs.str("mode", "avg")
    default_ct = "half_pixel" if ctx.opset >= 16 else "output_half_pixel"
    half_pixel = attrs.str("coordinate_transformation_mode", default_ct) == "half_pixel"
    work = compute_dtype(x.dtype).type
    data = x.astype(work, copy=False)
    height, width = x.shape[2:]
    result = np.zeros((rois.shape[0], x.shape[1], out_h, out_w), dtype=work)
    offset = 0.5 if half_pixel else 0.0
    for r in range(rois.shape[0]):
        # ROI geometry in the input's precision, as onnxruntime computes it (grid sizes depend
        # on it through ceil).
        x1, y1, x2, y2 = rois[r].astype(work) * work(scale) - work(offset)
        roi_w, roi_h = x2 - x1, y2 - y1
        if not half_pixel:
            roi_w, roi_h = max(roi_w, work(1.0)), max(roi_h, work(1.0))
        grid_h = ratio if ratio > 0 else int(np.ceil(roi_h / work(out_h)))
        grid_w = ratio if ratio > 0 else int(np.ceil(roi_w / work(out_w)))
        x1, y1, roi_w, roi_h = float(x1), float(y1), float(roi_w), float(roi_h)
        ylo, yhi, wyl, wyh = _axis_samples(y1, roi_h, out_h, grid_h, height)
        xlo, xhi, wxl, wxh = _axis_samples(x1, roi_w, out_w, grid_w, width)
        img = data[int(batch_indices[r])]
        terms = [
            img[:, ya][:, :, xa] * (wy[:, None] * wx[None, :])
            for ya, wy in ((ylo, wyl), (yhi, wyh))
            for xa, wx in ((xlo, wxl), (xhi, wxh))
        ]
        shape = (x.shape[1], out_h, max(grid_h, 1), out_w, max(grid_w, 1))
        if mode == "max":
            values = np.maximum.reduce(terms).reshape(shape)
            result[r] = values.max(axis=(2, 4))
        else:
            values = sum(terms).reshape(shape)
            result[r] = values.sum(axis=(2, 4)) / max(grid_h * grid_w, 1)
    return [result.astype(x.dtype, copy=False)]


def _roi_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """About eight operations per bilinear sample."""
    ratio = max(attrs.int("sampling_ratio", 0), 2)
    return OpCost(8 * ratio * ratio * _numel(outs[0]), _bytes(ins), _bytes(outs))


OPS: list[OpSpec] = [
    OpSpec("MaxPool", _max_pool, _pool_shape, _window_cost, family="pool"),
    OpSpec("AveragePool", _average_pool, _pool_shape, _window_cost, family="pool"),
    OpSpec("LpPool", _lp_pool, _pool_shape, _window_cost, family="pool"),
    OpSpec("GlobalAveragePool", _global("avg"), _global_shape, _global_cost, family="pool"),
    OpSpec("GlobalMaxPool", _global("max"), _global_shape, _global_cost, family="pool"),
    OpSpec("GlobalLpPool", _global("lp"), _global_shape, _global_cost, family="pool"),
    OpSpec("MaxUnpool", _max_unpool, _max_unpool_shape, _global_cost, family="pool"),
    OpSpec("MaxRoiPool", _max_roi_pool, _roi_shape, _roi_cost, family="pool"),
    OpSpec("RoiAlign", _roi_align, _roi_shape, _roi_cost, family="pool"),
]
