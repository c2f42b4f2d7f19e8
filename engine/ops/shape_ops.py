"""Shape ops: Reshape, Transpose, Flatten, (Un)Squeeze, Concat, Split, Shape, Size, Identity.

Expand, Tile, Pad, DepthToSpace and SpaceToDepth live in ``engine.ops.layout``, which reuses the
dim helpers defined here. Opset changes handled here: Reshape's shape is an attribute before
opset 5; Squeeze/Unsqueeze and Split take axes/split as inputs from opset 13 (Split gains
``num_outputs`` in 18); Shape gains ``start``/``end`` in 15.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.common import metadata_cost, movement_cost, normalize_axis, same_as_input
from engine.ops.registry import (
    Attrs,
    Kernel,
    KernelContext,
    KernelError,
    OpSpec,
    ShapeRule,
    TensorSpec,
    dtype_of_array,
)

Dim = int | str | None
Shape = tuple[Dim, ...]


def int_list(value: Any) -> list[int]:
    """A 1-D integer tensor (or None) as a Python list."""
    return [] if value is None else [int(v) for v in np.asarray(value).ravel()]


def const_input(specs: list[TensorSpec], index: int) -> np.ndarray | None:
    """Value of constant input ``index``; None when absent or not constant."""
    if index >= len(specs) or specs[index] is None:
        return None
    return specs[index].value


def has_input(specs: Sequence[Any], index: int) -> bool:
    """Whether optional input ``index`` is present."""
    return index < len(specs) and specs[index] is not None


def dims_product(dims: Sequence[Dim]) -> Dim:
    """Product of dims; None when any is not concrete."""
    if all(isinstance(d, int) for d in dims):
        return int(np.prod(dims, dtype=np.int64))
    return None


def unknown_spec(dtype: ir.DataType | None, rank: int | None = None) -> TensorSpec:
    """A spec of unknown dims (and unknown rank when ``rank`` is None)."""
    return TensorSpec(None if rank is None else (None,) * rank, dtype)


#: Largest input (in elements) that :func:`folding` evaluates at shape-inference time.
FOLD_LIMIT = 64


def folding(rule: ShapeRule, kernel: Kernel) -> ShapeRule:
    """Wrap ``rule`` so that small integer constants flow through ``kernel`` into the output
    specs' values, as ONNX's data propagation does for shape arithmetic (Shape -> Gather ->
    Concat -> Reshape). Inputs or outputs above ``FOLD_LIMIT`` elements, and non-integer
    inputs, get the plain rule."""

    def wrapped(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
        outputs = rule(specs, attrs, ctx)
        present = [s for s in specs if s is not None]
        arrays = [s.value for s in present]
        foldable = present and all(
            isinstance(a, np.ndarray) and a.dtype.kind in "iub" for a in arrays
        )
        if not foldable or sum(a.size for a in arrays) > FOLD_LIMIT:  # type: ignore[union-attr]
            return outputs
        if not all(o.is_static and o.numel() <= FOLD_LIMIT for o in outputs):
            return outputs
        results = kernel([None if s is None else s.value for s in specs], attrs, ctx)
        return [
            TensorSpec(tuple(int(d) for d in r.shape), dtype_of_array(r), r)
            if isinstance(r, np.ndarray)
            else out
            for out, r in zip(outputs, results, strict=False)
        ]

    return wrapped


# --------------------------------------------------------------------------- Reshape


def _reshape_target(in_shape: Shape, target: list[int], allowzero: bool) -> Shape:
    """Output shape of Reshape: 0 copies the input dim (unless allowzero), -1 is inferred."""
    dims: list[Dim] = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            if i >= len(in_shape):
                raise KernelError(f"Reshape: 0 at position {i} beyond input rank {len(in_shape)}")
            dims.append(in_shape[i])
        else:
            dims.append(d)
    if dims.count(-1) > 1:
        raise KernelError("Reshape: at most one -1 is allowed in the target shape")
    if -1 in dims:
        index = dims.index(-1)
        remaining = list(in_shape)
        others: list[Dim] = []
        for i, d in enumerate(dims):
            if i != index and isinstance(d, str) and d in remaining:
                remaining.remove(d)  # a symbolic dim on both sides cancels out
            elif i != index:
                others.append(d)
        total, known = dims_product(remaining), dims_product(others)
        if total is not None and known is not None:
            if known == 0 or total % known:
                raise KernelError(f"Reshape: cannot infer -1 reshaping {in_shape} to {target}")
            dims[index] = total // known
        else:
            dims[index] = None
    return tuple(dims)


def _reshape_shape_arg(inputs: Sequence[Any], attrs: Attrs, ctx: KernelContext) -> Any:
    return attrs.ints("shape") if ctx.opset < 5 else (inputs[1] if len(inputs) > 1 else None)


def _reshape(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    target = int_list(_reshape_shape_arg(inputs, attrs, ctx))
    shape = _reshape_target(x.shape, target, bool(attrs.int("allowzero", 0)))
    return [x.reshape(shape)]


def _reshape_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x = specs[0]
    target = attrs.ints("shape") if ctx.opset < 5 else const_input(specs, 1)
    if target is None:
        rank = specs[1].shape[0] if len(specs) > 1 and specs[1].shape else None
        return [unknown_spec(x.dtype, rank if isinstance(rank, int) else None)]
    in_shape = x.shape if x.shape is not None else ()
    allowzero = bool(attrs.int("allowzero", 0))
    if x.shape is None and (0 in int_list(target) or -1 in int_list(target)):
        dims = tuple(d if d > 0 or (d == 0 and allowzero) else None for d in int_list(target))
        return [TensorSpec(dims, x.dtype)]
    return [TensorSpec(_reshape_target(in_shape, int_list(target), allowzero), x.dtype)]


# --------------------------------------------------------------------------- Transpose, Flatten


def _perm(attrs: Attrs, rank: int) -> list[int]:
    return attrs.ints("perm") or list(range(rank))[::-1]


def _transpose(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    return [np.ascontiguousarray(np.transpose(x, _perm(attrs, x.ndim)))]


def _transpose_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x = specs[0]
    if x.shape is None:
        return [unknown_spec(x.dtype, len(attrs.ints("perm") or []) or None)]
    return [TensorSpec(tuple(x.shape[p] for p in _perm(attrs, len(x.shape))), x.dtype)]


def _flatten_dims(shape: Shape, attrs: Attrs) -> Shape:
    rank = len(shape)
    axis = attrs.int("axis", 1)
    if not -rank <= axis <= rank:
        raise KernelError(f"Flatten axis {axis} out of range for rank {rank}")
    axis = axis + rank if axis < 0 else axis
    return (dims_product(shape[:axis]), dims_product(shape[axis:]))


def _flatten(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    return [x.reshape(_flatten_dims(x.shape, attrs))]


def _flatten_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x = specs[0]
    if x.shape is None:
        return [unknown_spec(x.dtype, 2)]
    return [TensorSpec(_flatten_dims(x.shape, attrs), x.dtype)]


# --------------------------------------------------------------------------- Squeeze, Unsqueeze


def _axes_arg(values: Sequence[Any], attrs: Attrs, ctx: KernelContext) -> list[int] | None:
    """Axes of (Un)Squeeze: attribute before opset 13, optional input 1 after (None: absent)."""
    if ctx.opset < 13:
        return attrs.ints("axes")
    return int_list(values[1]) if has_input(values, 1) else None


def _squeeze_dims(shape: Shape, axes: list[int] | None) -> Shape:
    rank = len(shape)
    if axes is None:
        return tuple(d for d in shape if d != 1)
    drop = {normalize_axis(a, rank) for a in axes}
    for axis in drop:
        if isinstance(shape[axis], int) and shape[axis] != 1:
            raise KernelError(f"Squeeze: axis {axis} has size {shape[axis]}, not 1")
    return tuple(d for i, d in enumerate(shape) if i not in drop)


def _unsqueeze_dims(shape: Shape, axes: list[int]) -> Shape:
    rank = len(shape) + len(axes)
    inserted = {normalize_axis(a, rank) for a in axes}
    if len(inserted) != len(axes):
        raise KernelError(f"Unsqueeze: repeated axes {axes}")
    rest = iter(shape)
    return tuple(1 if i in inserted else next(rest) for i in range(rank))


def _squeeze(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    return [x.reshape(_squeeze_dims(x.shape, _axes_arg(inputs, attrs, ctx)))]


def _unsqueeze(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    return [x.reshape(_unsqueeze_dims(x.shape, _axes_arg(inputs, attrs, ctx) or []))]


def _squeeze_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x = specs[0]
    values = [s.value if s is not None else None for s in specs]
    if (ctx.opset >= 13 and has_input(specs, 1) and values[1] is None) or x.shape is None:
        return [unknown_spec(x.dtype)]
    axes = _axes_arg(values, attrs, ctx)
    if axes is None and any(not isinstance(d, int) for d in x.shape):
        return [unknown_spec(x.dtype)]
    return [TensorSpec(_squeeze_dims(x.shape, axes), x.dtype)]


def _unsqueeze_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x = specs[0]
    values = [s.value if s is not None else None for s in specs]
    if x.shape is None or (ctx.opset >= 13 and (not has_input(specs, 1) or values[1] is None)):
        return [unknown_spec(x.dtype)]
    return [TensorSpec(_unsqueeze_dims(x.shape, _axes_arg(values, attrs, ctx) or []), x.dtype)]


# --------------------------------------------------------------------------- Concat, Split


def _concat(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    arrays = [x for x in inputs if x is not None]
    axis = normalize_axis(attrs.int("axis"), arrays[0].ndim)
    return [np.concatenate(arrays, axis=axis)]


def _concat_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    present = [s for s in specs if s is not None]
    dtype = present[0].dtype
    known = [s for s in present if s.shape is not None]
    if not known:
        return [unknown_spec(dtype)]
    rank = len(known[0].shape)  # type: ignore[arg-type]
    axis = normalize_axis(attrs.int("axis"), rank)
    dims: list[Dim] = []
    for i in range(rank):
        column = [s.shape[i] for s in known]  # type: ignore[index]
        if i == axis:
            dims.append(_sum(column) if len(known) == len(present) else None)
        else:
            concrete = [d for d in column if isinstance(d, int)]
            dims.append(concrete[0] if concrete else column[0])
    return [TensorSpec(tuple(dims), dtype)]


def _sum(dims: Sequence[Dim]) -> Dim:
    return sum(dims) if all(isinstance(d, int) for d in dims) else None  # type: ignore[arg-type]


def _split_sizes(length: Dim, split: list[int] | None, attrs: Attrs, outputs: int) -> list[Dim]:
    """Sizes of the Split outputs: explicit, ``num_outputs`` (last may be smaller) or equal."""
    if split:
        if isinstance(length, int) and sum(split) != length:
            raise KernelError(f"Split sizes {split} do not add up to the axis length {length}")
        return list(split)
    count = attrs.int("num_outputs", outputs) if "num_outputs" in attrs else outputs
    if not isinstance(length, int):
        return [None] * count
    if "num_outputs" in attrs:
        chunk = -(-length // count)
        return [min(chunk, max(length - chunk * i, 0)) for i in range(count)]
    if length % count:
        raise KernelError(f"Split: axis length {length} is not divisible into {count} outputs")
    return [length // count] * count


def _split_arg(values: Sequence[Any], attrs: Attrs, ctx: KernelContext) -> list[int] | None:
    if ctx.opset >= 13 or (ctx.opset < 2 and has_input(values, 1)):
        return int_list(values[1]) if has_input(values, 1) else None
    return attrs.ints("split")


def _split(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    axis = normalize_axis(attrs.int("axis", 0), x.ndim)
    sizes = _split_sizes(x.shape[axis], _split_arg(inputs, attrs, ctx), attrs, ctx.output_count)
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


def _split_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x = specs[0]
    count = attrs.int("num_outputs") if "num_outputs" in attrs else ctx.output_count
    if x.shape is None:
        return [unknown_spec(x.dtype) for _ in range(count)]
    axis = normalize_axis(attrs.int("axis", 0), len(x.shape))
    values = [s.value if s is not None else None for s in specs]
    if ctx.opset >= 13 and has_input(specs, 1) and values[1] is None:
        sizes: list[Dim] = [None] * count
    else:
        sizes = _split_sizes(x.shape[axis], _split_arg(values, attrs, ctx), attrs, count)
    return [
        TensorSpec(tuple(size if i == axis else d for i, d in enumerate(x.shape)), x.dtype)
        for size in sizes
    ]


# --------------------------------------------------------------------------- Shape, Size


def _shape_range(rank: int, attrs: Attrs) -> tuple[int, int]:
    """Clamped [start, end) of the Shape op's slice of the dims."""
    start = attrs.int("start", 0)
    end = attrs.int("end", rank) if "end" in attrs else rank
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return start, max(start, end)


def _shape(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    start, end = _shape_range(x.ndim, attrs)
    return [np.array(x.shape[start:end], dtype=np.int64)]


def _shape_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x = specs[0]
    if x.shape is None:
        return [unknown_spec(ir.DataType.INT64, 1)]
    start, end = _shape_range(len(x.shape), attrs)
    dims = x.shape[start:end]
    value = np.array(dims, dtype=np.int64) if all(isinstance(d, int) for d in dims) else None
    return [TensorSpec((end - start,), ir.DataType.INT64, value)]


def _size(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    return [np.array(inputs[0].size, dtype=np.int64)]


def _size_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x = specs[0]
    total = dims_product(x.shape) if x.shape is not None else None
    value = None if total is None else np.array(total, dtype=np.int64)
    return [TensorSpec((), ir.DataType.INT64, value)]


def _identity(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    value = inputs[0]
    if isinstance(value, list):
        return [list(value)]
    return [value.copy() if isinstance(value, np.ndarray) else value]


def _folded(op_type: str, kernel: Kernel, rule: ShapeRule) -> OpSpec:
    """A data-movement op whose shape rule also folds small integer constants."""
    return OpSpec(op_type, kernel, folding(rule, kernel), movement_cost, family="shape")


OPS: list[OpSpec] = [
    _folded("Reshape", _reshape, _reshape_shape),
    OpSpec("Transpose", _transpose, _transpose_shape, movement_cost, family="shape"),
    _folded("Flatten", _flatten, _flatten_shape),
    _folded("Squeeze", _squeeze, _squeeze_shape),
    _folded("Unsqueeze", _unsqueeze, _unsqueeze_shape),
    _folded("Concat", _concat, _concat_shape),
    OpSpec("Split", _split, _split_shape, movement_cost, family="shape"),
    OpSpec("Shape", _shape, _shape_shape, metadata_cost, family="shape"),
    OpSpec("Size", _size, _size_shape, metadata_cost, family="shape"),
    _folded("Identity", _identity, same_as_input(0)),
]
