"""Reductions and axis-wise normalisations: Reduce*, ArgMax/ArgMin, TopK, Softmax family, CumSum.

Opset changes handled here: Reduce* take ``axes`` as an attribute before opset 18 (ReduceSum:
13) and as an optional input afterwards, together with ``noop_with_empty_axes``; Softmax,
LogSoftmax and Hardmax flatten the input to 2-D around ``axis`` (default 1) before opset 13 and
work on a single axis (default -1) from opset 13 on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.common import input_elements_cost, normalize_axis, same_as_input
from engine.ops.registry import Attrs, KernelContext, KernelError, OpSpec, TensorSpec
from engine.ops.shape_ops import folding

Dim = int | str | None

#: First opset in which each reduction reads ``axes`` from its second input.
_AXES_INPUT_OPSET = {"ReduceSum": 13}
_DEFAULT_AXES_INPUT_OPSET = 18

#: Marks an axes input whose value is not known (shape rules on non-constant axes).
_UNKNOWN = object()


# --------------------------------------------------------------------------- axes resolution


def _axes_from(
    op_type: str, axes_input: Any, attrs: Attrs, ctx: KernelContext, rank: int
) -> tuple[int, ...] | None:
    """The normalised axes to reduce, ``()`` for a no-op, or None when unknown (shape rules)."""
    if ctx.opset >= _AXES_INPUT_OPSET.get(op_type, _DEFAULT_AXES_INPUT_OPSET):
        if axes_input is _UNKNOWN:
            return None
        axes = [] if axes_input is None else [int(a) for a in np.asarray(axes_input).ravel()]
        if not axes:
            return () if attrs.int("noop_with_empty_axes", 0) else tuple(range(rank))
    else:
        axes = attrs.ints("axes") or list(range(rank))
    normalized = sorted({normalize_axis(a, rank) for a in axes})
    return tuple(normalized)


def _reduce_spec(
    op_type: str,
    reducer: Callable[[np.ndarray, tuple[int, ...]], np.ndarray],
    flops: int,
) -> OpSpec:
    """Spec of a Reduce* op; ``reducer(x, axes)`` reduces with keepdims=True."""

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        x = inputs[0]
        axes_input = inputs[1] if len(inputs) > 1 else None
        axes = _axes_from(op_type, axes_input, attrs, ctx, x.ndim)
        assert axes is not None
        if not axes:
            return [x.copy()]
        result = np.asarray(reducer(x, axes))
        if not attrs.int("keepdims", 1):
            result = result.reshape([d for i, d in enumerate(result.shape) if i not in axes])
        return [result.astype(x.dtype, copy=False)]

    def shape_rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
        x = specs[0]
        keepdims = bool(attrs.int("keepdims", 1))
        if x.shape is None:
            return [TensorSpec(None, x.dtype)]
        axes_spec = specs[1] if len(specs) > 1 else None
        axes_value: Any = None
        if axes_spec is not None:
            axes_value = axes_spec.value if axes_spec.value is not None else _UNKNOWN
            if axes_spec.value is None and axes_spec.shape == (0,):
                axes_value = None
        axes = _axes_from(op_type, axes_value, attrs, ctx, len(x.shape))
        if axes is None:
            shape = tuple(None for _ in x.shape) if keepdims else None
            return [TensorSpec(shape, x.dtype)]
        if not axes:
            return [TensorSpec(x.shape, x.dtype)]
        dims = [1 if i in axes else d for i, d in enumerate(x.shape)]
        if not keepdims:
            dims = [d for i, d in enumerate(dims) if i not in axes]
        return [TensorSpec(tuple(dims), x.dtype)]

    rule = folding(shape_rule, kernel)
    return OpSpec(op_type, kernel, rule, input_elements_cost(flops), family="reduce")


def _extreme(x: np.ndarray, largest: bool) -> Any:
    """Identity element of max (``largest``) or min over an empty set for x's dtype."""
    if x.dtype == np.bool_:
        return not largest
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        return info.min if largest else info.max
    return -np.inf if largest else np.inf


def _max(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.max(x, axis=axes, keepdims=True, initial=_extreme(x, True))


def _min(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.min(x, axis=axes, keepdims=True, initial=_extreme(x, False))


def _sum(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.sum(x, axis=axes, keepdims=True, dtype=x.dtype)


def _mean(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.mean(x, axis=axes, keepdims=True)


def _prod(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.prod(x, axis=axes, keepdims=True, dtype=x.dtype)


def _l1(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.sum(np.abs(x), axis=axes, keepdims=True, dtype=x.dtype)


def _l2(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.sqrt(np.sum(np.square(x), axis=axes, keepdims=True))


def _sum_square(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.sum(np.square(x), axis=axes, keepdims=True, dtype=x.dtype)


def _log_sum(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.log(np.sum(x, axis=axes, keepdims=True))


def _log_sum_exp(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    if x.size == 0:
        return np.log(np.sum(np.exp(x), axis=axes, keepdims=True))
    peak = np.max(x, axis=axes, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0)
    return np.log(np.sum(np.exp(x - peak), axis=axes, keepdims=True)) + peak


# --------------------------------------------------------------------------- ArgMax / ArgMin


def _arg_spec(op_type: str, function: Callable[..., np.ndarray]) -> OpSpec:
    """ArgMax/ArgMin: int64 index of the first (or last) extreme along ``axis``."""

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        x = inputs[0]
        axis = normalize_axis(attrs.int("axis", 0), x.ndim)
        if attrs.int("select_last_index", 0):
            flipped = np.flip(x, axis=axis)
            result = x.shape[axis] - 1 - function(flipped, axis=axis, keepdims=True)
        else:
            result = function(x, axis=axis, keepdims=True)
        if not attrs.int("keepdims", 1):
            result = np.squeeze(result, axis=axis)
        return [result.astype(np.int64)]

    def shape_rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
        x = specs[0]
        if x.shape is None:
            return [TensorSpec(None, ir.DataType.INT64)]
        axis = normalize_axis(attrs.int("axis", 0), len(x.shape))
        dims = [1 if i == axis else d for i, d in enumerate(x.shape)]
        if not attrs.int("keepdims", 1):
            del dims[axis]
        return [TensorSpec(tuple(dims), ir.DataType.INT64)]

    return OpSpec(op_type, kernel, shape_rule, input_elements_cost(1), family="reduce")


# --------------------------------------------------------------------------- TopK


def _top_k_count(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> int:
    if ctx.opset < 10:
        return attrs.int("k")
    return int(np.asarray(inputs[1]).ravel()[0])


def _top_k(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Values and int64 indices of the k largest (or smallest) along ``axis``; ties keep the
    lower index first, as ONNX requires."""
    x = inputs[0]
    k = _top_k_count(inputs, attrs, ctx)
    axis = normalize_axis(attrs.int("axis", -1), x.ndim)
    n = x.shape[axis]
    if k < 0 or k > n:
        raise KernelError(f"TopK k={k} is out of range for axis of length {n}")
    if attrs.int("largest", 1):
        # Stable ascending sort of the reversed axis, read backwards: descending values with
        # equal values in ascending original index order.
        order = np.argsort(np.flip(x, axis=axis), axis=axis, kind="stable")
        order = n - 1 - np.flip(order, axis=axis)
    else:
        order = np.argsort(x, axis=axis, kind="stable")
    indices = np.take(order, np.arange(k), axis=axis).astype(np.int64)
    return [np.take_along_axis(x, indices, axis=axis), indices]


def _top_k_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x = specs[0]
    if x.shape is None:
        return [TensorSpec(None, x.dtype), TensorSpec(None, ir.DataType.INT64)]
    axis = normalize_axis(attrs.int("axis", -1), len(x.shape))
    k: Dim
    if ctx.opset < 10:
        k = attrs.int("k")
    elif len(specs) > 1 and specs[1] is not None and specs[1].value is not None:
        k = int(np.asarray(specs[1].value).ravel()[0])
    else:
        k = None
    dims = tuple(k if i == axis else d for i, d in enumerate(x.shape))
    return [TensorSpec(dims, x.dtype), TensorSpec(dims, ir.DataType.INT64)]


# --------------------------------------------------------------------------- Softmax family


def _softmax_axis_apply(
    x: np.ndarray, attrs: Attrs, ctx: KernelContext, function: Callable[[np.ndarray, int], Any]
) -> np.ndarray:
    """Apply ``function(array, axis)`` with the opset's axis semantics (2-D coercion < 13)."""
    if ctx.opset >= 13:
        return np.asarray(function(x, normalize_axis(attrs.int("axis", -1), x.ndim)))
    axis = normalize_axis(attrs.int("axis", 1), x.ndim) if x.ndim else 0
    rows = int(np.prod(x.shape[:axis], dtype=np.int64))
    flat = x.reshape(rows, -1)
    return np.asarray(function(flat, 1)).reshape(x.shape)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _hardmax(x: np.ndarray, axis: int) -> np.ndarray:
    first = np.expand_dims(np.argmax(x, axis=axis), axis)
    positions = np.arange(x.shape[axis]).reshape([-1 if i == axis else 1 for i in range(x.ndim)])
    return positions == first


def _axis_wise_spec(op_type: str, function: Callable[[np.ndarray, int], Any], flops: int) -> OpSpec:
    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        x = inputs[0]
        return [_softmax_axis_apply(x, attrs, ctx, function).astype(x.dtype, copy=False)]

    return OpSpec(op_type, kernel, same_as_input(0), input_elements_cost(flops), family="reduce")


# --------------------------------------------------------------------------- CumSum


def _cumsum(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Running sum along the axis input; ``exclusive`` shifts by one, ``reverse`` runs back."""
    x = inputs[0]
    axis = normalize_axis(int(np.asarray(inputs[1]).ravel()[0]), x.ndim)
    reverse = bool(attrs.int("reverse", 0))
    data = np.flip(x, axis=axis) if reverse else x
    if attrs.int("exclusive", 0):
        # Sum of the strictly preceding elements: shift the data one step along the axis.
        widths = [(1, 0) if i == axis else (0, 0) for i in range(x.ndim)]
        data = np.take(np.pad(data, widths), np.arange(x.shape[axis]), axis=axis)
    result = np.cumsum(data, axis=axis, dtype=x.dtype)
    if reverse:
        result = np.flip(result, axis=axis)
    return [np.ascontiguousarray(result)]


OPS: list[OpSpec] = [
    _reduce_spec("ReduceSum", _sum, 1),
    _reduce_spec("ReduceMean", _mean, 1),
    _reduce_spec("ReduceMax", _max, 1),
    _reduce_spec("ReduceMin", _min, 1),
    _reduce_spec("ReduceProd", _prod, 1),
    _reduce_spec("ReduceL1", _l1, 2),
    _reduce_spec("ReduceL2", _l2, 2),
    _reduce_spec("ReduceSumSquare", _sum_square, 2),
    _reduce_spec("ReduceLogSum", _log_sum, 1),
    _reduce_spec("ReduceLogSumExp", _log_sum_exp, 4),
    _arg_spec("ArgMax", np.argmax),
    _arg_spec("ArgMin", np.argmin),
    OpSpec("TopK", _top_k, _top_k_shape, input_elements_cost(2), family="reduce"),
    _axis_wise_spec("Softmax", _softmax, 5),
    _axis_wise_spec("LogSoftmax", _log_softmax, 5),
    _axis_wise_spec("Hardmax", _hardmax, 2),
    OpSpec("CumSum", _cumsum, same_as_input(0), input_elements_cost(1), family="reduce"),
]
