"""Lowering of ONNX Resize (kernels/resize.cu): nearest and linear over H and W of a 4-D tensor,
every coordinate transformation and nearest mode, NCHW or NHWC (an NHWC-stored input is
resized in place of a layout conversion). Geometry (output size, scales) comes from the
reference's own plan (:func:`engine.ops.resize._resize_plan`), so both pick the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.backends.cuda.data_movement_args import THREADS, blocks_for, constant_value
from engine.backends.cuda.lowering import LowerContext, LowerFunction, LoweringError
from engine.backends.cuda.tactic_checks import input_name, static_shape
from engine.backends.cuda.tactics import CudaTactic
from engine.build.plan import Layer, Plan
from engine.config import Precision
from engine.ops.registry import Attrs, KernelError
from engine.ops.resize import _resize_plan

RESIZE_FILE = "resize.cu"
FAMILY = "data_movement"
ANY_PRECISION = frozenset(Precision)
_DT = ir.DataType

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


def check_resize(layer: Layer, plan: Plan) -> str | None:
    shape = static_shape(plan, input_name(layer, 0))
    if shape is None:
        return "input shape is not static"
    modes = resize_modes(layer.attrs, layer.context.opset)
    if isinstance(modes, str):
        return modes
    if layer.context.opset < 11:
        return "Resize-10 (scales as input 1) is not lowered"
    roi = constant_value(plan, input_name(layer, 1))
    if roi is not None and np.size(roi) and not _trivial_roi(roi):
        return "roi is not in the kernel"
    scales, sizes = (
        constant_value(plan, input_name(layer, 2)),
        constant_value(plan, input_name(layer, 3)),
    )
    if (input_name(layer, 2) and scales is None) or (input_name(layer, 3) and sizes is None):
        return "scales / sizes are not constants"
    geometry = resize_geometry(shape, scales, sizes, layer.attrs)
    return geometry if isinstance(geometry, str) else None


def _trivial_roi(roi: np.ndarray) -> bool:
    values = np.asarray(roi, dtype=np.float64).reshape(-1)
    half = len(values) // 2
    return bool(np.allclose(values[:half], 0) and np.allclose(values[half:], 1))


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
    x, y = ctx.input(0, layout), ctx.output(0, layout)
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


TACTICS: list[CudaTactic] = [
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

LOWERINGS: dict[str, LowerFunction] = {"resize_f32": lower_resize, "resize_f16": lower_resize}
