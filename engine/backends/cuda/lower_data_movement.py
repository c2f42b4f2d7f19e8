"""Lowerings of the data-movement layers: Transpose, Slice, Split, Expand, Concat, Gather
(kernels/data_movement.cu; their scalar arguments come from
:mod:`engine.backends.cuda.data_movement_args`). Resize is :mod:`engine.backends.cuda.lower_resize`.

The copies are generic over the element width (entries ``_b1``/``_b2``/``_b4``/``_b8`` with
``unsigned char``/``short``/``unsigned``/``unsigned long long`` pointers): :func:`as_bits`
re-types a buffer to the unsigned integer of its width (same bytes), so any dtype of that width
moves through the same kernel. One tactic per op and width (``transpose_b4`` runs float32 and
int32 ...), so a timed tactic is exactly one entry point.

Ranks up to 6 after :func:`coalesce` (axes contiguous in both tensors merged, dims of 1
dropped) are passed as scalars; a higher rank is refused. NHWC-stored inputs need no layout
conversion: Transpose and Slice read them through their strides (output plain), Concat (all
inputs NHWC) and Resize write NHWC; Gather reads plain layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.backends.cuda.data_movement_args import (
    FILE,
    THREADS,
    WIDTHS,
    as_bits,
    blocks_for,
    concat_arguments,
    constant_value,
    expand_arguments,
    gather_arguments,
    nhwc_strides,
    slice_arguments,
    transpose_arguments,
)
from engine.backends.cuda.launch_plan import DeviceBuffer
from engine.backends.cuda.lowering import LowerContext, LowerFunction, LoweringError
from engine.backends.cuda.tactic_checks import input_name, static_shape
from engine.backends.cuda.tactics import CudaTactic
from engine.build.plan import Layer, Plan
from engine.config import Precision
from engine.ops.common import normalize_axis
from engine.ops.indexing import _slice_args
from engine.ops.registry import KernelError

# --------------------------------------------------------------------------- tactic checks


def _shape(plan: Plan, layer: Layer, index: int) -> tuple[int, ...] | None:
    return static_shape(plan, input_name(layer, index))


def check_transpose(layer: Layer, plan: Plan) -> str | None:
    shape = _shape(plan, layer, 0)
    if shape is None:
        return "input shape is not static"
    if transpose_arguments(shape, layer.attrs.ints("perm")) is None:
        return "more than 6 axes after merging contiguous ones"
    return None


def _slice_values(layer: Layer, plan: Plan, rank: int) -> tuple | str:
    values: list[Any] = [None]
    for index in range(1, 5):
        name = input_name(layer, index)
        value = constant_value(plan, name)
        if name and value is None:
            return f"input {index} ({name}) is not a constant"
        values.append(value)
    try:
        return _slice_args(values, layer.attrs, layer.context, rank)
    except KernelError as error:
        return str(error)


def check_slice(layer: Layer, plan: Plan) -> str | None:
    shape = _shape(plan, layer, 0)
    if shape is None:
        return "input shape is not static"
    parsed = _slice_values(layer, plan, len(shape))
    if isinstance(parsed, str):
        return parsed
    if slice_arguments(shape, *parsed) is None:
        return "more than 6 axes after merging contiguous ones"
    return None


def check_concat(layer: Layer, plan: Plan) -> str | None:
    if any(static_shape(plan, name) is None for name in layer.inputs if name):
        return "input shapes are not static"
    return None


def check_gather(layer: Layer, plan: Plan) -> str | None:
    if _shape(plan, layer, 0) is None or _shape(plan, layer, 1) is None:
        return "input shapes are not static"
    spec = plan.specs.get(input_name(layer, 1))
    if spec is None or spec.dtype != ir.DataType.INT64:
        return "the kernel reads int64 indices"
    return None


# --------------------------------------------------------------------------- lowerings


def _suffix(ctx: LowerContext) -> str:
    width = ctx.input_dtype(0).itemsize
    if width not in WIDTHS:
        raise LoweringError(f"no data-movement kernel for {width}-byte elements")
    return WIDTHS[width][0]


def _input(ctx: LowerContext, index: int, layout: str = "plain") -> DeviceBuffer:
    buffer = ctx.input(index, layout)
    if buffer is None:
        raise LoweringError(f"input {index} is missing")
    return buffer


def _strided_input(ctx: LowerContext) -> tuple[DeviceBuffer, list[int] | None]:
    """Input 0 as stored (NHWC read in place through its strides) and its logical strides."""
    shape = ctx.input_shape(0)
    if len(shape) == 4 and ctx.stored_layout(0) == "nhwc" and ctx.constant(0) is None:
        return _input(ctx, 0, "nhwc"), nhwc_strides(shape)
    return _input(ctx, 0), None


def lower_transpose(ctx: LowerContext) -> None:
    shape = ctx.input_shape(0)
    source, layout_strides = _strided_input(ctx)
    arguments = transpose_arguments(shape, ctx.attrs.ints("perm"), layout_strides)
    if arguments is None:
        raise LoweringError("more than 6 axes after merging contiguous ones")
    n, dims, strides = arguments
    x, y = as_bits(source), as_bits(ctx.output(0))
    if n == 0:
        return
    ctx.launch(
        FILE,
        f"gie_transpose_{_suffix(ctx)}",
        (blocks_for(n),),
        (THREADS,),
        (x, y, n, *dims, *strides),
    )


def lower_slice(ctx: LowerContext) -> None:
    shape = ctx.input_shape(0)
    values: list[Any] = [None] + [ctx.constant(i) for i in range(1, 5)]
    for index in range(1, 5):
        if ctx.has_input(index) and values[index] is None:
            raise LoweringError(f"Slice input {index} is not a constant")
    starts, ends, axes, steps = _slice_args(values, ctx.attrs, ctx.layer.context, len(shape))
    source, layout_strides = _strided_input(ctx)
    arguments = slice_arguments(shape, starts, ends, axes, steps, layout_strides)
    if arguments is None:
        raise LoweringError("more than 6 axes after merging contiguous ones")
    n, offset, dims, strides = arguments
    x, y = as_bits(source), as_bits(ctx.output(0))
    if n == 0:
        return
    ctx.launch(
        FILE,
        f"gie_slice_{_suffix(ctx)}",
        (blocks_for(n),),
        (THREADS,),
        (x, y, n, offset, *dims, *strides),
    )


def check_expand(layer: Layer, plan: Plan) -> str | None:
    in_shape, out_shape = _shape(plan, layer, 0), static_shape(plan, layer.outputs[0])
    if in_shape is None or out_shape is None:
        return "input or output shape is not static"
    if len(in_shape) > len(out_shape) or expand_arguments(in_shape, out_shape) is None:
        return f"cannot broadcast {list(in_shape)} to {list(out_shape)} in 6 strided axes"
    return None


def lower_expand(ctx: LowerContext) -> None:
    """Expand as a strided copy (gie_slice) with stride 0 along the broadcast axes."""
    arguments = expand_arguments(ctx.input_shape(0), ctx.output_shape(0))
    if arguments is None:
        raise LoweringError("more than 6 axes after merging contiguous ones")
    n, dims, strides = arguments
    x, y = as_bits(_input(ctx, 0)), as_bits(ctx.output(0))
    if n:
        args = (x, y, n, 0, *dims, *strides)
        ctx.launch(FILE, f"gie_slice_{_suffix(ctx)}", (blocks_for(n),), (THREADS,), args)


def check_split(layer: Layer, plan: Plan) -> str | None:
    shape = _shape(plan, layer, 0)
    outs = [static_shape(plan, name) for name in layer.outputs if name]
    if shape is None or any(o is None for o in outs):
        return "input or output shapes are not static"
    return None


def lower_split(ctx: LowerContext) -> None:
    """Split as one strided copy (gie_slice) per output, each from its offset along the axis;
    an NHWC-stored input is read in place through its strides."""
    shape = ctx.input_shape(0)
    axis = normalize_axis(ctx.attrs.int("axis", 0), len(shape))
    source, layout_strides = _strided_input(ctx)
    x = as_bits(source)
    start = 0
    for index, name in enumerate(ctx.layer.outputs):
        size = ctx.output_shape(index)[axis]
        if name:
            arguments = slice_arguments(shape, [start], [start + size], [axis], [1], layout_strides)
            if arguments is None:
                raise LoweringError("more than 6 axes after merging contiguous ones")
            n, offset, dims, strides = arguments
            y = as_bits(ctx.output(index))
            if n:
                args = (x, y, n, offset, *dims, *strides)
                ctx.launch(FILE, f"gie_slice_{_suffix(ctx)}", (blocks_for(n),), (THREADS,), args)
        start += size


#: Logical NCHW axis -> its position in NHWC storage.
_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}


def lower_concat(ctx: LowerContext) -> None:
    present = [i for i in range(len(ctx.layer.inputs)) if ctx.has_input(i)]
    shapes = [ctx.input_shape(i) for i in present]
    axis = normalize_axis(ctx.attrs.int("axis", 0), len(shapes[0]))
    nhwc = len(shapes[0]) == 4 and all(
        ctx.stored_layout(i) == "nhwc" and ctx.constant(i) is None for i in present
    )
    layout = "nhwc" if nhwc else "plain"
    if nhwc:  # the same copies on the stored N, H, W, C order
        shapes = [(s[0], s[2], s[3], s[1]) for s in shapes]
        axis = _NHWC_AXIS[axis]
    y = as_bits(ctx.output(0, layout))
    suffix = _suffix(ctx)
    for index, (outer, slab, row, offset) in zip(present, concat_arguments(shapes, axis)):
        if outer * slab == 0:
            continue
        x = as_bits(_input(ctx, index, layout))
        ctx.launch(
            FILE,
            f"gie_concat_{suffix}",
            (blocks_for(outer * slab),),
            (THREADS,),
            (x, y, outer, slab, row, offset),
        )


def lower_gather(ctx: LowerContext) -> None:
    shape, index_shape = ctx.input_shape(0), ctx.input_shape(1)
    count = math.prod(index_shape)
    outer, axis_dim, count, inner = gather_arguments(shape, ctx.attrs.int("axis", 0), count)
    constant = ctx.constant(1)
    if constant is not None:
        flat = np.asarray(constant, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < -axis_dim or flat.max() >= axis_dim):
            raise LoweringError(f"Gather index out of range for an axis of length {axis_dim}")
        indices = ctx.weight(f"gather:{ctx.layer.inputs[1]}:int64", flat)
    else:
        indices = _input(ctx, 1)
        if indices.dtype != "int64":
            raise LoweringError("the kernel reads int64 indices")
    x, y = as_bits(_input(ctx, 0)), as_bits(ctx.output(0))
    total = outer * count * inner
    if total == 0:
        return
    ctx.launch(
        FILE,
        f"gie_gather_{_suffix(ctx)}",
        (blocks_for(total),),
        (THREADS,),
        (x, indices, y, outer, axis_dim, count, inner),
    )


# --------------------------------------------------------------------------- catalogue

_DT = ir.DataType
#: Data dtypes per element width (the generic copies' tactics).
WIDTH_DTYPES: dict[int, frozenset[ir.DataType]] = {
    1: frozenset({_DT.INT8, _DT.UINT8, _DT.BOOL, _DT.FLOAT8E4M3FN, _DT.FLOAT8E5M2}),
    2: frozenset({_DT.FLOAT16, _DT.BFLOAT16, _DT.INT16, _DT.UINT16}),
    4: frozenset({_DT.FLOAT, _DT.INT32, _DT.UINT32}),
    8: frozenset({_DT.DOUBLE, _DT.INT64, _DT.UINT64}),
}
ANY_PRECISION = frozenset(Precision)
FAMILY = "data_movement"
_COPIES: tuple[tuple[str, str, Callable[[Layer, Plan], str | None], LowerFunction], ...] = (
    ("transpose", "Transpose", check_transpose, lower_transpose),
    ("slice", "Slice", check_slice, lower_slice),
    ("concat", "Concat", check_concat, lower_concat),
    ("gather", "Gather", check_gather, lower_gather),
)

TACTICS: list[CudaTactic] = [
    *(
        CudaTactic(
            f"{kind}_{WIDTHS[width][0]}",
            FAMILY,
            frozenset({op}),
            FILE,
            f"gie_{kind}_{WIDTHS[width][0]}",
            (),
            check,
            (5, 0),
            WIDTH_DTYPES[width],
            ANY_PRECISION,
        )
        for kind, op, check, _ in _COPIES
        for width in WIDTHS
    ),
    *(
        CudaTactic(
            f"split_{WIDTHS[width][0]}",
            FAMILY,
            frozenset({"Split"}),
            FILE,
            f"gie_slice_{WIDTHS[width][0]}",
            (),
            check_split,
            (5, 0),
            WIDTH_DTYPES[width],
            ANY_PRECISION,
        )
        for width in WIDTHS
    ),
    *(
        CudaTactic(
            f"expand_{WIDTHS[width][0]}",
            FAMILY,
            frozenset({"Expand"}),
            FILE,
            f"gie_slice_{WIDTHS[width][0]}",
            (),
            check_expand,
            (5, 0),
            WIDTH_DTYPES[width],
            ANY_PRECISION,
        )
        for width in WIDTHS
    ),
]

LOWERINGS: dict[str, LowerFunction] = {
    **{f"{kind}_{WIDTHS[width][0]}": lower for kind, _, _, lower in _COPIES for width in WIDTHS},
    **{f"expand_{WIDTHS[width][0]}": lower_expand for width in WIDTHS},
    **{f"split_{WIDTHS[width][0]}": lower_split for width in WIDTHS},
}

__all__ = [
    "LOWERINGS",
    "TACTICS",
    "as_bits",
    "concat_arguments",
    "gather_arguments",
    "lower_concat",
    "lower_gather",
    "lower_slice",
    "lower_transpose",
    "slice_arguments",
    "transpose_arguments",
]
