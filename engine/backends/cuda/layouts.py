"""Layout changes of the CUDA backend: the transpose launch between plain NCHW and NHWC storage
of one tensor, and when none is needed (the two orders coincide when H * W == 1 or C == 1)."""

from __future__ import annotations

import numpy as np

from engine.backends.cuda.launch_plan import DeviceBuffer, KernelLaunch, KernelSource


class LayoutError(ValueError):
    """No layout kernel for this tensor (not 4-D)."""


def same_bytes_in_both_layouts(shape: tuple[int, ...]) -> bool:
    """Whether NCHW and NHWC order the elements alike (H * W == 1 or C == 1)."""
    return len(shape) == 4 and (shape[2] * shape[3] == 1 or shape[1] == 1)


def layout_launch(src: DeviceBuffer, dst: DeviceBuffer) -> KernelLaunch:
    """The transpose between plain NCHW and NHWC storage of the same tensor: reformat.cu's
    tiled kernels for fp32/fp16, data_movement.cu's generic transpose for other widths."""
    if len(src.shape) != 4:
        raise LayoutError(f"no layout kernel for {src.describe()} -> {dst.layout}")
    n, c, h, w = src.shape
    suffix = {"float32": "f32", "float16": "f16"}.get(src.dtype)
    if suffix is not None:
        hw = h * w
        direction = "nchw_to_nhwc" if dst.layout == "nhwc" else "nhwc_to_nchw"
        return KernelLaunch(
            KernelSource(file="reformat.cu"),
            f"gie_{direction}_{suffix}",
            (-(-hw // 32), -(-c // 32), n),
            (32, 8, 1),
            (src, dst, n, c, hw),
            (src,),
            (dst,),
        )
    from engine.backends.cuda.data_movement_args import (
        THREADS,
        as_bits,
        blocks_for,
        transpose_arguments,
    )

    # Output in memory order: NHWC (perm 0, 2, 3, 1 of NCHW) or NCHW (0, 3, 1, 2 of NHWC).
    stored = src.stored_shape
    perm = (0, 2, 3, 1) if dst.layout == "nhwc" else (0, 3, 1, 2)
    arguments = transpose_arguments(stored, perm)
    assert arguments is not None
    count, dims, strides = arguments
    x, y = as_bits(src), as_bits(dst)
    width = {1: "b1", 2: "b2", 4: "b4", 8: "b8"}[np.dtype(src.dtype).itemsize]
    return KernelLaunch(
        KernelSource(file="data_movement.cu"),
        f"gie_transpose_{width}",
        (blocks_for(count), 1, 1),
        (THREADS, 1, 1),
        (x, y, count, *dims, *strides),
        (x,),
        (y,),
    )
