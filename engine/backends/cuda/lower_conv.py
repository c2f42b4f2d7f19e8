"""Lowerings of the convolution and pooling tactics (NHWC kernels).

The activation is read and written in the ``nhwc`` layout (the lowering converts at the edges
of NHWC chains); a convolution weight is uploaded once as KRSC (``[M, KH, KW, C/groups]``), a
depthwise one as ``[C, KH, KW]``, a 1x1 one as the ``[C, M]`` B operand of a GEMM. Geometry
(output size, begin pads, ceil mode, auto_pad) comes from :func:`engine.ops.conv.window_geometry`,
the same function the reference kernels use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from engine.backends.cuda.activations import activation_arguments
from engine.backends.cuda.launch_plan import DeviceBuffer
from engine.backends.cuda.lowering import LowerContext, LowerFunction, LoweringError
from engine.backends.cuda.tactic_checks import input_name, static_shape
from engine.backends.cuda.tactics import CATALOGUE, CudaTactic
from engine.build.plan import Layer, Plan
from engine.config import Precision
from engine.ops.conv import window_attrs, window_geometry

#: Largest grid of the grid-stride kernels (blocks); any grid is correct for them.
MAX_STRIDE_BLOCKS = 4096


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def stride_grid(total: int, threads: int = 256) -> tuple[int]:
    """A grid for a grid-stride kernel over ``total`` elements."""
    return (max(1, min(_ceil(total, threads), MAX_STRIDE_BLOCKS)),)


@dataclass(frozen=True)
class Window:
    """2-D sliding-window geometry: kernel, strides, dilations, begin/end pads, output size."""

    kh: int
    kw: int
    stride_h: int
    stride_w: int
    dil_h: int
    dil_w: int
    pad_top: int
    pad_left: int
    pad_bottom: int
    pad_right: int
    oh: int
    ow: int


def window(ctx: LowerContext, kernel: tuple[int, int] | None = None) -> Window:
    shape = ctx.input_shape(0)
    if len(shape) != 4:
        raise LoweringError(f"only 2-D windows (input {list(shape)})")
    kernel_shape, strides, dilations, pads, auto_pad = window_attrs(ctx.attrs, 2, kernel)
    ceil = bool(ctx.attrs.int("ceil_mode", 0))
    outs, begins, ends = window_geometry(
        shape[2:], kernel_shape, strides, dilations, pads, auto_pad, ceil
    )
    declared = list(pads) if pads else [0, 0, 0, 0]
    ends_declared = declared[2:] if auto_pad == "NOTSET" else ends
    return Window(
        kernel_shape[0], kernel_shape[1], strides[0], strides[1], dilations[0], dilations[1],
        begins[0], begins[1], ends_declared[0], ends_declared[1], int(outs[0]), int(outs[1]),
    )  # fmt: skip


def _suffix(dtype: np.dtype) -> str:
    return "f16" if dtype == np.float16 else "f32"


def _conv_parts(
    ctx: LowerContext,
) -> tuple[np.ndarray, DeviceBuffer | None, DeviceBuffer | None, tuple[int, float, float, int]]:
    """(host weight OIHW, bias buffer, residual buffer nhwc, epilogue arguments)."""
    weight = ctx.constant(1)
    if weight is None:
        raise LoweringError("the convolution weight is not a constant")
    dtype = ctx.input_dtype(0)
    m = weight.shape[0]
    bias = None
    value = ctx.constant(2)
    if value is not None:
        bias = ctx.weight(
            f"{ctx.layer.inputs[2]}:bias:{dtype}", np.asarray(value, dtype).reshape(m)
        )
    elif ctx.has_input(2):
        bias = ctx.input(2)
    residual = ctx.input(3, "nhwc") if ctx.layer.op_type == "ConvAct" else None
    if ctx.layer.op_type == "ConvAct":
        code, alpha, beta = activation_arguments(ctx.attrs)
    else:
        code, alpha, beta = 0, 0.0, 0.0
    first = ctx.attrs.int("residual_before_activation", 1)
    return np.asarray(weight), bias, residual, (code, alpha, beta, first)


def lower_conv_igemm(ctx: LowerContext, tactic: CudaTactic) -> None:
    """conv_implicit_gemm.cu (any groups)."""
    weight, bias, residual, epilogue = _conv_parts(ctx)
    dtype = ctx.input_dtype(0)
    n, c, h, w = ctx.input_shape(0)
    m = weight.shape[0]
    groups = ctx.attrs.int("group", 1)
    g = window(ctx, tuple(weight.shape[2:]))  # type: ignore[arg-type]
    krsc = np.ascontiguousarray(weight.transpose(0, 2, 3, 1)).astype(dtype)
    w_buffer = ctx.weight(f"{ctx.layer.inputs[1]}:krsc:{dtype}", krsc)
    x = ctx.input(0, "nhwc")
    y = ctx.output(0, "nhwc")
    defines = dict(tactic.defines)
    bm, bn = defines.get("GIE_CONV_BM", 64), defines.get("GIE_CONV_BN", 64)
    pixels = n * g.oh * g.ow
    args = (
        x, w_buffer, bias, residual, y, n, h, w, c, m, g.oh, g.ow, g.kh, g.kw, g.stride_h,
        g.stride_w, g.pad_top, g.pad_left, g.dil_h, g.dil_w, groups, *epilogue,
    )  # fmt: skip
    grid = (_ceil(pixels, bm), _ceil(m // groups, bn), groups)
    ctx.launch(tactic.kernel_file, tactic.entry, grid, (256,), args, tactic.defines)


def lower_conv_depthwise(ctx: LowerContext, tactic: CudaTactic) -> None:
    """conv_depthwise.cu (group = C = M)."""
    weight, bias, residual, epilogue = _conv_parts(ctx)
    dtype = ctx.input_dtype(0)
    n, c, h, w = ctx.input_shape(0)
    g = window(ctx, tuple(weight.shape[2:]))  # type: ignore[arg-type]
    crs = np.ascontiguousarray(weight[:, 0]).astype(dtype)
    w_buffer = ctx.weight(f"{ctx.layer.inputs[1]}:crs:{dtype}", crs)
    x = ctx.input(0, "nhwc")
    y = ctx.output(0, "nhwc")
    args = (
        x, w_buffer, bias, residual, y, n, h, w, c, g.oh, g.ow, g.kh, g.kw, g.stride_h,
        g.stride_w, g.pad_top, g.pad_left, g.dil_h, g.dil_w, *epilogue,
    )  # fmt: skip
    ctx.launch(tactic.kernel_file, tactic.entry, stride_grid(n * g.oh * g.ow * c), (256,), args)


def lower_conv_1x1(ctx: LowerContext, tactic: CudaTactic) -> None:
    """A 1x1 stride-1 unpadded convolution as one GEMM over NHWC pixels."""
    weight, bias, residual, epilogue = _conv_parts(ctx)
    dtype = ctx.input_dtype(0)
    n, c, h, w = ctx.input_shape(0)
    m = weight.shape[0]
    pixels = n * h * w
    b = ctx.weight(
        f"{ctx.layer.inputs[1]}:cm:{dtype}",
        np.ascontiguousarray(weight[:, :, 0, 0].T).astype(dtype),
    )
    x = ctx.input(0, "nhwc")
    y = ctx.output(0, "nhwc")
    assert x is not None

    def flat(buffer: DeviceBuffer, cols: int) -> DeviceBuffer:
        return DeviceBuffer(buffer.region, buffer.offset, buffer.dtype, (pixels, cols))

    res = None if residual is None else flat(residual, m)
    args = (flat(x, c), b, bias, res, flat(y, m), pixels, m, c, c, m, m, *epilogue)
    if "mma" in tactic.entry:
        grid, block = (_ceil(m, 8), _ceil(pixels, 16)), (32,)
    else:
        grid, block = (_ceil(m, 64), _ceil(pixels, 64)), (256,)
    ctx.launch(tactic.kernel_file, tactic.entry, grid, block, args)


def lower_pool(ctx: LowerContext, tactic: CudaTactic) -> None:
    """pool.cu: max / average / global average pooling over NHWC."""
    n, c, h, w = ctx.input_shape(0)
    x = ctx.input(0, "nhwc")
    if ctx.layer.op_type == "GlobalAveragePool":
        y = ctx.output(0, "nhwc")
        ctx.launch(tactic.kernel_file, tactic.entry, (_ceil(c, 32), n), (32, 8), (x, y, h, w, c))
        return
    g = window(ctx)
    y = ctx.output(0, "nhwc")
    common = (
        x,
        y,
        n,
        h,
        w,
        c,
        g.oh,
        g.ow,
        g.kh,
        g.kw,
        g.stride_h,
        g.stride_w,
        g.pad_top,
        g.pad_left,
    )
    if ctx.layer.op_type == "MaxPool":
        args = (*common, g.dil_h, g.dil_w)
    else:
        include = ctx.attrs.int("count_include_pad", 0)
        args = (*common, g.pad_bottom, g.pad_right, g.dil_h, g.dil_w, include)
    ctx.launch(tactic.kernel_file, tactic.entry, stride_grid(n * g.oh * g.ow * c), (256,), args)


def conv_transpose_check(layer: Layer, plan: Plan) -> str | None:
    """kernels/conv_transpose.cu: 2-D, constant weight, static shapes."""
    x = static_shape(plan, input_name(layer, 0))
    w = plan.constants.get(input_name(layer, 1))
    out = static_shape(plan, layer.outputs[0])
    if x is None or out is None or len(x) != 4:
        return "only 2-D transposed convolutions with static shapes"
    if w is None:
        return "the weight is not a constant"
    return None


def lower_conv_transpose(ctx: LowerContext, tactic: CudaTactic) -> None:
    """ConvTranspose in gather form over NHWC (geometry from the reference's own function)."""
    from engine.ops.conv import _transpose_geometry

    weight = ctx.constant(1)
    if weight is None:
        raise LoweringError("the weight is not a constant")
    dtype = ctx.input_dtype(0)
    n, c, h, w = ctx.input_shape(0)
    groups = ctx.attrs.int("group", 1)
    kh, kw = weight.shape[2:]
    _, m, oh, ow = ctx.output_shape(0)
    _, begins = _transpose_geometry((h, w), (kh, kw), ctx.attrs)
    strides = ctx.attrs.ints("strides") or [1, 1]
    dilations = ctx.attrs.ints("dilations") or [1, 1]
    w_buffer = ctx.weight(f"{ctx.layer.inputs[1]}:cmrs:{dtype}", np.asarray(weight, dtype))
    bias = None
    value = ctx.constant(2)
    if value is not None:
        bias = ctx.weight(
            f"{ctx.layer.inputs[2]}:bias:{dtype}", np.asarray(value, dtype).reshape(m)
        )
    x, y = ctx.input(0, "nhwc"), ctx.output(0, "nhwc")
    args = (
        x, w_buffer, bias, y, n, h, w, c, m, oh, ow, kh, kw, strides[0], strides[1],
        begins[0], begins[1], dilations[0], dilations[1], groups,
    )  # fmt: skip
    ctx.launch(tactic.kernel_file, tactic.entry, stride_grid(n * oh * ow * m), (256,), args)


def _bind(function, tactic: CudaTactic) -> LowerFunction:  # type: ignore[no-untyped-def]
    def lower(ctx: LowerContext) -> None:
        function(ctx, tactic)

    return lower


_BY_FAMILY = {
    "conv_implicit_gemm": lower_conv_igemm,
    "conv_depthwise": lower_conv_depthwise,
    "conv_1x1_gemm": lower_conv_1x1,
    "pool": lower_pool,
}

LOWERINGS: dict[str, LowerFunction] = {
    t.name: _bind(_BY_FAMILY[t.family], t)
    for t in CATALOGUE
    if t.family in _BY_FAMILY
    and t.kernel_file is not None
    and "mma" not in t.name
    and "imma" not in t.name
} | {t.name: _bind(lower_conv_1x1, t) for t in CATALOGUE if t.name == "conv1x1_gemm_mma_f16"}
TACTICS: list[CudaTactic] = [
    CudaTactic(f"conv_transpose_{suffix}", "conv_transpose", frozenset({"ConvTranspose"}),
               "conv_transpose.cu", f"gie_conv_transpose_{suffix}", (), conv_transpose_check,
               cc, frozenset({dtype}), precisions)
    for suffix, dtype, precisions, cc in (
        ("f32", ir.DataType.FLOAT, frozenset({Precision.FP32, Precision.TF32}), (5, 0)),
        ("f16", ir.DataType.FLOAT16, frozenset({Precision.FP16}), (5, 3)),
    )
]  # fmt: skip
LOWERINGS.update({t.name: _bind(lower_conv_transpose, t) for t in TACTICS})
