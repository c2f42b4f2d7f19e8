"""Indexing ops: Slice, Gather*, Scatter*, NonZero, Trilu, Compress, OneHot, Unique,
ReverseSequence.

Opset changes handled here: Slice reads starts/ends/axes from attributes before opset 10 and from
inputs (plus ``steps``) afterwards; ScatterElements/ScatterND gain ``reduction`` in 16 (max/min
in 18); Scatter is the pre-opset-11 name of ScatterElements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.common import (
    elementwise_cost,
    movement_cost,
    normalize_axis,
    same_as_input,
)
from engine.ops.registry import Attrs, KernelContext, KernelError, OpSpec, TensorSpec
from engine.ops.shape_ops import folding

Dim = int | str | None


def _ints(value: Any) -> list[int]:
    return [] if value is None else [int(v) for v in np.asarray(value).ravel()]


def _has(values: Sequence[Any], index: int) -> bool:
    return index < len(values) and values[index] is not None


def _value(specs: list[TensorSpec], index: int) -> np.ndarray | None:
    return specs[index].value if _has(specs, index) else None


# --------------------------------------------------------------------------- Slice


def _slice_args(
    values: Sequence[Any], attrs: Attrs, ctx: KernelContext, rank: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """(starts, ends, axes, steps) of a Slice, from attributes (opset < 10) or inputs."""
    if ctx.opset < 10:
        starts, ends = attrs.ints("starts") or [], attrs.ints("ends") or []
        axes = attrs.ints("axes")
        steps = None
    else:
        starts, ends = _ints(values[1]), _ints(values[2])
        axes = _ints(values[3]) if _has(values, 3) else None
        steps = _ints(values[4]) if _has(values, 4) else None
    axes = [normalize_axis(a, rank) for a in (axes if axes is not None else range(len(starts)))]
    steps = steps if steps is not None else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise KernelError("Slice: starts, ends, axes and steps differ in length")
    if any(s == 0 for s in steps):
        raise KernelError("Slice: steps must not be 0")
    return starts, ends, axes, steps


def _clamped_range(start: int, end: int, step: int, dim: int) -> tuple[int, int]:
    """ONNX clamping: [0, dim] for positive steps, [-1, dim-1] (end) / [0, dim-1] for negative."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


def _slice(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(*_slice_args(inputs, attrs, ctx, x.ndim), strict=True):
        first, stop = _clamped_range(start, end, step, x.shape[axis])
        index[axis] = slice(first, stop if stop >= 0 else None, step)
    return [x[tuple(index)].copy()]


def _slice_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x = specs[0]
    if x.shape is None:
        return [TensorSpec(None, x.dtype)]
    values = [s.value if s is not None else None for s in specs]
    needed = [1, 2] + [i for i in (3, 4) if _has(specs, i)]
    if ctx.opset >= 10 and any(values[i] is None for i in needed):
        return [TensorSpec((None,) * len(x.shape), x.dtype)]
    dims = list(x.shape)
    for start, end, axis, step in zip(*_slice_args(values, attrs, ctx, len(x.shape)), strict=True):
        dim = dims[axis]
        if isinstance(dim, int):
            first, stop = _clamped_range(start, end, step, dim)
            dims[axis] = len(range(first, stop, step))
        else:
            dims[axis] = None
    return [TensorSpec(tuple(dims), x.dtype)]


# --------------------------------------------------------------------------- Gather family


def _positive(indices: np.ndarray, dim: int) -> np.ndarray:
    """Indices with negatives wrapped, checked against ``dim``."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < -dim or indices.max() >= dim):
        raise KernelError(f"index out of range for axis of length {dim}")
    return np.where(indices < 0, indices + dim, indices)


def _gather(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x, indices = inputs
    axis = normalize_axis(attrs.int("axis", 0), x.ndim)
    return [np.asarray(np.take(x, _positive(indices, x.shape[axis]), axis=axis))]


def _gather_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x, indices = specs[0], specs[1]
    if x.shape is None or indices.shape is None:
        return [TensorSpec(None, x.dtype)]
    axis = normalize_axis(attrs.int("axis", 0), len(x.shape))
    return [TensorSpec(x.shape[:axis] + indices.shape + x.shape[axis + 1 :], x.dtype)]


def _gather_elements(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x, indices = inputs
    axis = normalize_axis(attrs.int("axis", 0), x.ndim)
    return [np.take_along_axis(x, _positive(indices, x.shape[axis]), axis=axis)]


def _gather_nd(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Gather slices of ``data`` addressed by the last axis of ``indices`` per batch."""
    data, indices = inputs
    batch = attrs.int("batch_dims", 0)
    k = indices.shape[-1]
    batch_shape = data.shape[:batch]
    count = int(np.prod(batch_shape, dtype=np.int64))
    flat_data = data.reshape((count, *data.shape[batch:]))
    flat_idx = indices.reshape((count, -1, k)).astype(np.int64)
    dims = np.asarray(data.shape[batch : batch + k], dtype=np.int64)
    if flat_idx.size and (np.any(flat_idx < -dims) or np.any(flat_idx >= dims)):
        raise KernelError("GatherND: index out of range")
    flat_idx = np.where(flat_idx < 0, flat_idx + dims, flat_idx)
    rows = np.arange(count).reshape(count, 1)
    picked = flat_data[(rows, *(flat_idx[..., j] for j in range(k)))]
    out_shape = indices.shape[:-1] + data.shape[batch + k :]
    return [picked.reshape(out_shape)]


def _gather_nd_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    data, indices = specs[0], specs[1]
    if data.shape is None or indices.shape is None or not isinstance(indices.shape[-1], int):
        return [TensorSpec(None, data.dtype)]
    batch = attrs.int("batch_dims", 0)
    k = indices.shape[-1]
    return [TensorSpec(indices.shape[:-1] + data.shape[batch + k :], data.dtype)]


# --------------------------------------------------------------------------- Scatter family

_REDUCERS = {
    "add": np.add,
    "mul": np.multiply,
    "max": np.maximum,
    "min": np.minimum,
}


def _scatter_into(
    out: np.ndarray, where: tuple[np.ndarray, ...], updates: np.ndarray, reduction: str
) -> np.ndarray:
    if reduction == "none":
        out[where] = updates
    elif reduction in _REDUCERS:
        _REDUCERS[reduction].at(out, where, updates)
    else:
        raise KernelError(f"unsupported scatter reduction '{reduction}'")
    return out


def _scatter_elements(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Write ``updates`` into a copy of ``data`` at ``indices`` along ``axis`` (or reduce)."""
    data, indices, updates = inputs
    axis = normalize_axis(attrs.int("axis", 0), data.ndim)
    where = list(np.indices(indices.shape, sparse=True))
    where[axis] = _positive(indices, data.shape[axis])
    reduction = attrs.str("reduction", "none") or "none"
    return [_scatter_into(data.copy(), tuple(where), updates, reduction)]


def _scatter_nd(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    data, indices, updates = inputs
    k = indices.shape[-1]
    dims = np.asarray(data.shape[:k], dtype=np.int64)
    idx = indices.astype(np.int64)
    idx = np.where(idx < 0, idx + dims, idx)
    where = tuple(idx[..., j] for j in range(k))
    reduction = attrs.str("reduction", "none") or "none"
    return [_scatter_into(data.copy(), where, updates, reduction)]


# --------------------------------------------------------------------------- misc indexing


def _nonzero(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    if x.ndim == 0:
        return [np.zeros((0, int(bool(x))), dtype=np.int64)]
    return [np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1)]


def _trilu(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    k = _ints(inputs[1])[0] if _has(inputs, 1) else 0
    upper = attrs.int("upper", 1)
    return [np.triu(x, k) if upper else np.tril(x, k)]


def _compress(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x, condition = inputs
    condition = np.asarray(condition, dtype=bool).ravel()
    if "axis" not in attrs:
        return [np.compress(condition, x.ravel())]
    axis = normalize_axis(attrs.int("axis"), x.ndim)
    return [np.compress(condition, x, axis=axis)]


def _one_hot(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """``values[1]`` where the index matches the position on the new axis, else ``values[0]``."""
    indices, depth_value, values = inputs
    depth = int(np.asarray(depth_value).ravel()[0])
    rank = indices.ndim + 1
    axis = normalize_axis(attrs.int("axis", -1), rank)
    wrapped = np.asarray(indices).astype(np.int64)
    wrapped = np.where(wrapped < 0, wrapped + depth, wrapped)
    positions = np.arange(depth).reshape([-1 if i == axis else 1 for i in range(rank)])
    hot = np.expand_dims(wrapped, axis) == positions
    return [np.where(hot, values[1], values[0]).astype(values.dtype)]


def _one_hot_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    indices, depth, values = specs
    if indices.shape is None:
        return [TensorSpec(None, values.dtype)]
    size: Dim = None if depth.value is None else int(np.asarray(depth.value).ravel()[0])
    dims: list[Dim] = list(indices.shape)
    dims.insert(normalize_axis(attrs.int("axis", -1), len(dims) + 1), size)
    return [TensorSpec(tuple(dims), values.dtype)]


def _unique(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Unique values (or slices along ``axis``), first-occurrence indices, inverse, counts."""
    x = inputs[0]
    axis = normalize_axis(attrs.int("axis"), x.ndim) if "axis" in attrs else None
    values, first, inverse, counts = np.unique(
        x if axis is not None else x.ravel(),
        return_index=True,
        return_inverse=True,
        return_counts=True,
        axis=axis,
    )
    inverse = inverse.reshape(-1)
    if not attrs.int("sorted", 1):
        order = np.argsort(first, kind="stable")
        values = np.take(values, order, axis=axis or 0)
        first, counts = first[order], counts[order]
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        inverse = rank[inverse]
    as_int64 = [np.asarray(a, dtype=np.int64) for a in (first, inverse, counts)]
    return [values, *as_int64]


def _unique_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x = specs[0]
    values: tuple[Dim, ...] | None = (None,)
    if "axis" in attrs:
        values = None
        if x.shape is not None:
            axis = normalize_axis(attrs.int("axis"), len(x.shape))
            values = tuple(None if i == axis else d for i, d in enumerate(x.shape))
    int64 = [TensorSpec((None,), ir.DataType.INT64) for _ in range(3)]
    return [TensorSpec(values, x.dtype), *int64][: max(ctx.output_count, 1)]


def _gather_elements_shape(
    specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext
) -> list[TensorSpec]:
    return [TensorSpec(specs[1].shape, specs[0].dtype)]


def _nonzero_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """NonZero's count depends on the data: only the row count (the input rank) is known."""
    rank = specs[0].rank
    return [TensorSpec(None if rank is None else (max(rank, 1), None), ir.DataType.INT64)]


def _compress_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """Compress keeps every dim but the compressed one, whose length depends on the data."""
    x = specs[0]
    if "axis" not in attrs:
        return [TensorSpec((None,), x.dtype)]
    if x.shape is None:
        return [TensorSpec(None, x.dtype)]
    axis = normalize_axis(attrs.int("axis"), len(x.shape))
    return [TensorSpec(tuple(None if i == axis else d for i, d in enumerate(x.shape)), x.dtype)]


def _reverse_sequence(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Reverse the first ``sequence_lens[b]`` steps along the time axis of every batch entry."""
    x, lengths = inputs
    batch_axis = normalize_axis(attrs.int("batch_axis", 1), x.ndim)
    time_axis = normalize_axis(attrs.int("time_axis", 0), x.ndim)
    steps = np.arange(x.shape[time_axis]).reshape(1, -1)
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1, 1)
    source = np.where(steps < lens, lens - 1 - steps, steps)  # [batch, time]
    if batch_axis > time_axis:
        source = source.T
    shape = [1] * x.ndim
    shape[batch_axis], shape[time_axis] = x.shape[batch_axis], x.shape[time_axis]
    index = np.broadcast_to(source.reshape(shape), x.shape)
    return [np.take_along_axis(x, index, axis=time_axis)]


OPS: list[OpSpec] = [
    OpSpec("Slice", _slice, folding(_slice_shape, _slice), movement_cost, family="indexing"),
    OpSpec("Gather", _gather, folding(_gather_shape, _gather), movement_cost, family="indexing"),
    OpSpec(
        "GatherElements",
        _gather_elements,
        _gather_elements_shape,
        movement_cost,
        family="indexing",
    ),
    OpSpec("GatherND", _gather_nd, _gather_nd_shape, movement_cost, family="indexing"),
    OpSpec(
        "ScatterElements",
        _scatter_elements,
        same_as_input(0),
        elementwise_cost(1),
        family="indexing",
    ),
    OpSpec("Scatter", _scatter_elements, same_as_input(0), elementwise_cost(1), family="indexing"),
    OpSpec("ScatterND", _scatter_nd, same_as_input(0), elementwise_cost(1), family="indexing"),
    OpSpec("NonZero", _nonzero, _nonzero_shape, movement_cost, family="indexing"),
    OpSpec("Trilu", _trilu, same_as_input(0), movement_cost, family="indexing"),
    OpSpec("Compress", _compress, _compress_shape, movement_cost, family="indexing"),
    OpSpec("OneHot", _one_hot, _one_hot_shape, elementwise_cost(1), family="indexing"),
    OpSpec("Unique", _unique, _unique_shape, elementwise_cost(2), family="indexing"),
    OpSpec(
        "ReverseSequence", _reverse_sequence, same_as_input(0), movement_cost, family="indexing"
    ),
]
