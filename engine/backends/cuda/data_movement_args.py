"""Host-side arguments of the width-generic data-movement kernels (kernels/data_movement.cu):
grid sizes, the unsigned re-typing of buffers (:func:`as_bits`), and the (n, dims, strides)
scalars of transpose / slice / expand / concat / gather, shared by the lowerings and the tests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from engine.backends.cuda.launch_plan import DeviceBuffer
from engine.backends.cuda.lowering import LoweringError
from engine.build.plan import Plan
from engine.ops.common import normalize_axis
from engine.ops.indexing import _clamped_range

FILE = "data_movement.cu"
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


def expand_arguments(
    in_shape: Sequence[int], out_shape: Sequence[int]
) -> tuple[int, list[int], list[int]] | None:
    """gie_slice arguments (n, d1..d5, s0..s5) of Expand: stride 0 along broadcast axes."""
    padded = [1] * (len(out_shape) - len(in_shape)) + [int(d) for d in in_shape]
    contiguous = contiguous_strides(padded)
    strides = [0 if d != o else s for d, o, s in zip(padded, out_shape, contiguous, strict=True)]
    return strided_arguments([int(d) for d in out_shape], strides)


def nhwc_strides(shape: Sequence[int]) -> list[int]:
    """Element strides of the logical N, C, H, W axes of an NHWC-stored tensor."""
    _, c, h, w = shape
    return [h * w * c, 1, w * c, c]


def constant_value(plan: Plan, name: str) -> np.ndarray | None:
    """The value of ``name`` when it is a constant (weights, or known to shape inference)."""
    if not name:
        return None
    if name in plan.constants:
        return np.asarray(plan.constants[name])
    spec = plan.specs.get(name)
    value = None if spec is None else getattr(spec, "value", None)
    return None if value is None else np.asarray(value)
