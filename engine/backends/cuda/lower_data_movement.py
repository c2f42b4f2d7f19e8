"""Lowerings of the data-movement layers: Transpose, Slice, Concat, Gather (kernels/
data_movement.cu) and Resize (kernels/resize.cu), plus the host-side argument helpers the
kernel tests share.

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

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.backends.cuda.launch_plan import DeviceBuffer
from engine.backends.cuda.lowering import LowerContext, LowerFunction, LoweringError
from engine.backends.cuda.tactic_checks import input_name, static_shape
from engine.backends.cuda.tactics import CudaTactic
from engine.build.plan import Layer, Plan
from engine.config import Precision
from engine.ops.common import normalize_axis
from engine.ops.indexing import _clamped_range, _slice_args
from engine.ops.registry import Attrs, KernelError
from engine.ops.resize import _resize_plan

FILE = "data_movement.cu"
RESIZE_FILE = "resize.cu"
MAX_RANK = 6
#: Threads per block of every launch here (the kernels' __launch_bounds__ is 256).
THREADS = 256
#: Grid-stride kernels: at most this many blocks (a few waves on any current GPU).
MAX_BLOCKS = 4096
#: Element width (bytes) -> entry suffix and the unsigned dtype the kernel's pointers have.
WIDTHS: dict[int, tuple[str, str]] = {
    1: ("b1", "uint8"),
    2: ("b2", "uint16"),
    4: ("b4", "uint32"),
    8: ("b8", "uint64"),
}

# Resize codes (kernels/resize.cu).
RESIZE_MODES = {"nearest": 0, "linear": 1, "bilinear": 1}
RESIZE_COORDINATES = {
    "half_pixel": 0,
    "asymmetric": 1,
    "align_corners": 2,
    "pytorch_half_pixel": 3,
    "tf_half_pixel_for_nn": 4,
}
RESIZE_NEAREST = {
    "round_prefer_floor": 0,
    "round_prefer_ceil": 1,
    "floor": 2,
    "ceil": 3,
    "simple": 4,
}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def blocks_for(elements: int, threads: int = THREADS) -> int:
    """Blocks of a grid-stride launch over ``elements`` (at least 1)."""
    return max(1, min(MAX_BLOCKS, _ceil(elements, threads)))


def as_bits(buffer: DeviceBuffer) -> DeviceBuffer:
    """The same bytes typed as the unsigned integer of the element width (what the generic
    kernels' pointers are)."""
    width = np.dtype(buffer.dtype).itemsize
    if width not in WIDTHS:
        raise LoweringError(f"no data-movement kernel for {width}-byte elements ({buffer.dtype})")
    return dataclasses.replace(buffer, dtype=WIDTHS[width][1])


# --------------------------------------------------------------------------- argument helpers


def contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= int(dim)
    return strides[::-1]


def coalesce(dims: Sequence[int], strides: Sequence[int]) -> tuple[list[int], list[int]]:
    """Drop dims of 1 and merge neighbours (i, i + 1) with stride_i == stride_{i+1} * dim_{i+1}
    (the output is contiguous, so such axes are one axis of both tensors)."""
    out_dims: list[int] = []
    out_strides: list[int] = []
    for dim, stride in zip(dims, strides, strict=True):
        if dim == 1:
            continue
        if out_dims and out_strides[-1] == stride * dim:
            out_dims[-1] *= dim
            out_strides[-1] = stride
        else:
            out_dims.append(int(dim))
            out_strides.append(int(stride))
    return out_dims, out_strides


def strided_arguments(
    dims: Sequence[int], strides: Sequence[int]
) -> tuple[int, list[int], list[int]] | None:
    """(n, [d1..d5], [s0..s5]) for gie_transpose / gie_slice: output dims and the input stride
    of each output axis, coalesced and padded to rank 6 with leading 1s; None above rank 6."""
    merged_dims, merged_strides = coalesce(dims, strides)
    if len(merged_dims) > MAX_RANK:
        return None
    pad = MAX_RANK - len(merged_dims)
    full_dims = [1] * pad + merged_dims
    full_strides = [0] * pad + merged_strides
    return math.prod(dims), full_dims[1:], full_strides


def transpose_arguments(
    shape: Sequence[int], perm: Sequence[int] | None, strides: Sequence[int] | None = None
) -> tuple[int, list[int], list[int]] | None:
    """gie_transpose arguments (n, d1..d5, s0..s5) of Transpose(perm) on ``shape`` stored with
    ``strides`` (elements, per logical axis; contiguous when None)."""
    rank = len(shape)
    order = list(perm) if perm is not None else list(range(rank))[::-1]
    strides = list(strides) if strides is not None else contiguous_strides(shape)
    axes = [normalize_axis(a, rank) for a in order]
    return strided_arguments([shape[a] for a in axes], [strides[a] for a in axes])


def slice_arguments(
    shape: Sequence[int],
    starts: Sequence[int],
    ends: Sequence[int],
    axes: Sequence[int],
    steps: Sequence[int],
    strides: Sequence[int] | None = None,
) -> tuple[int, int, list[int], list[int]] | None:
    """gie_slice arguments (n, offset, d1..d5, s0..s5) of an ONNX Slice on ``shape`` stored with
    ``strides`` (contiguous when None; axes normalized; clamping as engine.ops.indexing); None
    above rank 6."""
    strides = list(strides) if strides is not None else contiguous_strides(shape)
    dims = [int(d) for d in shape]
    out_strides = list(strides)
    offset = 0
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        first, stop = _clamped_range(int(start), int(end), int(step), dims[axis])
        count = len(range(first, stop, int(step)))
        dims[axis] = count
        out_strides[axis] = int(step) * strides[axis]
        if count:
            offset += first * strides[axis]
    arguments = strided_arguments(dims, out_strides)
    if arguments is None:
        return None
    n, d, s = arguments
    return n, offset if n else 0, d, s


def concat_arguments(shapes: Sequence[Sequence[int]], axis: int) -> list[tuple[int, int, int, int]]:
    """Per input of Concat(axis): gie_concat's (outer, slab, row, offset)."""
    rank = len(shapes[0])
    axis = normalize_axis(axis, rank)
    outer = math.prod(shapes[0][:axis])
    inner = math.prod(shapes[0][axis + 1 :])
    total = sum(int(s[axis]) for s in shapes)
    found, start = [], 0
    for shape in shapes:
        extent = int(shape[axis])
        found.append((outer, extent * inner, total * inner, start * inner))
        start += extent
    return found


def gather_arguments(
    shape: Sequence[int], axis: int, index_count: int
) -> tuple[int, int, int, int]:
    """gie_gather's (outer, axis_dim, count, inner) of Gather(axis) with ``index_count`` indices."""
    axis = normalize_axis(axis, len(shape))
    return (
        math.prod(shape[:axis]),
        int(shape[axis]),
        int(index_count),
        math.prod(shape[axis + 1 :]),
    )


def resize_modes(attrs: Attrs, opset: int) -> tuple[int, int, int] | str:
    """(mode, coordinate_mode, nearest_mode) codes of a Resize, or why the kernel cannot."""
    mode = attrs.str("mode", "nearest") or "nearest"
    default_ct = "half_pixel" if opset >= 11 else "asymmetric"
    transform = attrs.str("coordinate_transformation_mode", default_ct) or default_ct
    nearest = attrs.str("nearest_mode", "round_prefer_floor") if opset >= 11 else "simple"
    if mode not in RESIZE_MODES:
        return f"mode {mode!r}: the kernel does nearest and (bi)linear"
    if transform not in RESIZE_COORDINATES:
        return f"coordinate_transformation_mode {transform!r} is not in the kernel"
    if nearest not in RESIZE_NEAREST:
        return f"nearest_mode {nearest!r} is not in the kernel"
    if attrs.int("antialias", 0) and RESIZE_MODES[mode] == 1:
        return "antialias is not in the kernel"
    if attrs.int("exclude_outside", 0):
        return "exclude_outside is not in the kernel"
    return RESIZE_MODES[mode], RESIZE_COORDINATES[transform], RESIZE_NEAREST[nearest or ""]


def resize_geometry(
    shape: Sequence[int], scales: Any, sizes: Any, attrs: Attrs
) -> tuple[int, int, float, float] | str:
    """(OH, OW, scale_h, scale_w) of a 4-D Resize from its constant scales / sizes, or why not.
    A scale is the float32 factor, or 0 when the factor is out / in (the kernel computes it)."""
    if len(shape) != 4:
        return f"rank {len(shape)}: the kernel resizes 4-D tensors"
    try:
        factor, out, _ = _resize_plan(tuple(shape), scales, sizes, attrs)
    except (KernelError, ValueError) as error:
        return str(error)
    for axis in (0, 1):
        if out[axis] != shape[axis] or not np.isclose(factor[axis], 1.0):
            return "N or C is resized: the kernel resizes H and W only"
    scales_hw = []
    for axis in (2, 3):
        exact = sizes is not None and np.size(sizes) and factor[axis] == out[axis] / shape[axis]
        # 0: the kernel forms out / in in fp64 (exactly the reference's factor for sizes).
        scales_hw.append(0.0 if exact else float(np.float32(factor[axis])))
    return int(out[2]), int(out[3]), scales_hw[0], scales_hw[1]


# --------------------------------------------------------------------------- tactic checks


def _shape(plan: Plan, layer: Layer, index: int) -> tuple[int, ...] | None:
    return static_shape(plan, input_name(layer, index))


def _constant(plan: Plan, name: str) -> np.ndarray | None:
    if not name:
        return None
    if name in plan.constants:
        return np.asarray(plan.constants[name])
    spec = plan.specs.get(name)
    value = None if spec is None else getattr(spec, "value", None)
    return None if value is None else np.asarray(value)


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
        value = _constant(plan, name)
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


def check_resize(layer: Layer, plan: Plan) -> str | None:
    shape = _shape(plan, layer, 0)
    if shape is None:
        return "input shape is not static"
    modes = resize_modes(layer.attrs, layer.context.opset)
    if isinstance(modes, str):
        return modes
    if layer.context.opset < 11:
        return "Resize-10 (scales as input 1) is not lowered"
    roi = _constant(plan, input_name(layer, 1))
    if roi is not None and np.size(roi) and not _trivial_roi(roi):
        return "roi is not in the kernel"
    scales, sizes = _constant(plan, input_name(layer, 2)), _constant(plan, input_name(layer, 3))
    if (input_name(layer, 2) and scales is None) or (input_name(layer, 3) and sizes is None):
        return "scales / sizes are not constants"
    geometry = resize_geometry(shape, scales, sizes, layer.attrs)
    return geometry if isinstance(geometry, str) else None


def _trivial_roi(roi: np.ndarray) -> bool:
    values = np.asarray(roi, dtype=np.float64).reshape(-1)
    half = len(values) // 2
    return bool(np.allclose(values[:half], 0) and np.allclose(values[half:], 1))


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


def nhwc_strides(shape: Sequence[int]) -> list[int]:
    """Element strides of the logical N, C, H, W axes of an NHWC-stored tensor."""
    _, c, h, w = shape
    return [h * w * c, 1, w * c, c]


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


def expand_arguments(
    in_shape: Sequence[int], out_shape: Sequence[int]
) -> tuple[int, list[int], list[int]] | None:
    """gie_slice arguments (n, d1..d5, s0..s5) of Expand: stride 0 along broadcast axes."""
    padded = [1] * (len(out_shape) - len(in_shape)) + [int(d) for d in in_shape]
    contiguous = contiguous_strides(padded)
    strides = [0 if d != o else s for d, o, s in zip(padded, out_shape, contiguous, strict=True)]
    return strided_arguments([int(d) for d in out_shape], strides)


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


def lower_resize(ctx: LowerContext) -> None:
    shape = ctx.input_shape(0)
    modes = resize_modes(ctx.attrs, ctx.layer.context.opset)
    if isinstance(modes, str):
        raise LoweringError(modes)
    scales, sizes = ctx.constant(2), ctx.constant(3)
    if (ctx.has_input(2) and scales is None) or (ctx.has_input(3) and sizes is None):
        raise LoweringError("Resize scales / sizes must be constants")
    geometry = resize_geometry(shape, scales, sizes, ctx.attrs)
    if isinstance(geometry, str):
        raise LoweringError(geometry)
    oh, ow, scale_h, scale_w = geometry
    dtype = ctx.input_dtype(0)
    suffix = {"float32": "f32", "float16": "f16"}.get(dtype.name)
    if suffix is None:
        raise LoweringError(f"Resize of {dtype.name}: the kernel is fp32 / fp16")
    layout = "nhwc" if ctx.stored_layout(0) == "nhwc" else "plain"
    x, y = _input(ctx, 0, layout), ctx.output(0, layout)
    n, c, h, w = shape
    total = n * c * oh * ow
    if total == 0:
        return
    entry = f"gie_resize_{'nhwc' if layout == 'nhwc' else 'nchw'}_{suffix}"
    ctx.launch(
        RESIZE_FILE,
        entry,
        (blocks_for(total),),
        (THREADS,),
        (x, y, n, c, h, w, oh, ow, scale_h, scale_w, *modes),
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
    CudaTactic(
        "resize_f32",
        FAMILY,
        frozenset({"Resize"}),
        RESIZE_FILE,
        "gie_resize_nchw_f32",
        (),
        check_resize,
        (5, 0),
        frozenset({_DT.FLOAT}),
        ANY_PRECISION,
    ),
    CudaTactic(
        "resize_f16",
        FAMILY,
        frozenset({"Resize"}),
        RESIZE_FILE,
        "gie_resize_nchw_f16",
        (),
        check_resize,
        (5, 3),
        frozenset({_DT.FLOAT16}),
        ANY_PRECISION,
    ),
]

LOWERINGS: dict[str, LowerFunction] = {
    **{f"{kind}_{WIDTHS[width][0]}": lower for kind, _, _, lower in _COPIES for width in WIDTHS},
    **{f"expand_{WIDTHS[width][0]}": lower_expand for width in WIDTHS},
    **{f"split_{WIDTHS[width][0]}": lower_split for width in WIDTHS},
    "resize_f32": lower_resize,
    "resize_f16": lower_resize,
}

__all__ = [
    "LOWERINGS",
    "TACTICS",
    "as_bits",
    "concat_arguments",
    "gather_arguments",
    "lower_concat",
    "lower_gather",
    "lower_resize",
    "lower_slice",
    "lower_transpose",
    "resize_geometry",
    "resize_modes",
    "slice_arguments",
    "transpose_arguments",
]
