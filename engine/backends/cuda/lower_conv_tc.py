"""Tactics and lowerings of the tensor-core implicit-GEMM convolutions (NHWC).

* ``conv_mma_f16_<BM>x<BN>`` (kernels/conv_mma_f16.cu, ``gie_conv_mma_f16``): Conv /
  gie::ConvAct in fp16 through mma.sync m16n8k16, fp32 accumulation, the ConvAct epilogue.
  Needs C / group % 8 == 0 (16-byte channel vectors) and, grouped, M / group % 8 == 0.
* ``conv_imma_<out>_<BM>x<BN>`` (kernels/conv_int8.cu, ``gie_conv_int8_s8/_f32/_f16``):
  gie::QConv through mma.sync m16n8k32 s8, bit-exact with the reference (int32 accumulation,
  saturating int32 bias, float32 requantization); one tactic per output type. Needs
  C / group % 16 == 0, K = KH * KW * C / group <= 131071, constant scales and a float32
  residual.

Both read the activation and write the output in the ``nhwc`` layout; the weight is uploaded
once transposed to KRSC ([M, KH, KW, C / group]). Geometry (output size, begin pads, auto_pad)
comes from :func:`engine.backends.cuda.lower_conv.window`. The kernels' 16-byte cp.async needs
16-byte aligned x and w: an fp16 input view that is not aligned falls back at lowering to the
SIMT kernel with the same arguments (conv_implicit_gemm.cu); an int8 one is refused. int8
tensors stored in plain NCHW are transposed with data_movement.cu's byte transpose (the layout
kernels of :mod:`engine.backends.cuda.lowering` cover fp32 / fp16 only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from engine.backends.cuda import lower_data_movement as dm
from engine.backends.cuda.activations import activation_arguments
from engine.backends.cuda.launch_plan import DeviceBuffer
from engine.backends.cuda.lower_conv import _conv_parts, window
from engine.backends.cuda.lowering import (
    LowerContext,
    LowerFunction,
    LoweringError,
    same_bytes_in_both_layouts,
)
from engine.backends.cuda.tactic_checks import (
    Check,
    conv_check,
    conv_geometry,
    input_name,
    int8_activation,
    static_shape,
)
from engine.backends.cuda.tactics import CONV_OPS, F16_ONLY, F16S, I8_ONLY, I8S, CudaTactic
from engine.build.plan import Layer, Plan

F16_FILE, F16_ENTRY = "conv_mma_f16.cu", "gie_conv_mma_f16"
FALLBACK_FILE, FALLBACK_ENTRY = "conv_implicit_gemm.cu", "gie_conv_implicit_gemm_f16"
INT8_FILE = "conv_int8.cu"
QCONV_OPS = frozenset({"gie::QConv"})
#: int8 reduction depth limit (qparams.MAX_INT32_DEPTH: no int32 overflow).
MAX_INT8_DEPTH = (2**31 - 1) // (128 * 128)
#: Largest grid z (groups).
MAX_GRID_Z = 65535
#: Output dtype code of gie::QConv -> (entry suffix, ONNX type).
INT8_OUTPUTS = {"s8": ir.DataType.INT8, "f32": ir.DataType.FLOAT, "f16": ir.DataType.FLOAT16}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ConvTile:
    """One tile variant: BM pixels x BN output channels per block, warps_m x warps_n warps."""

    prefix: str  # "GIE_CONVMMA" or "GIE_CONVI8"
    bm: int
    bn: int
    warps_m: int = 2
    warps_n: int = 2

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def defines(self) -> tuple[tuple[str, int], ...]:
        p = self.prefix
        return (
            (f"{p}_BM", self.bm),
            (f"{p}_BN", self.bn),
            (f"{p}_WARPS_M", self.warps_m),
            (f"{p}_WARPS_N", self.warps_n),
        )


F16_TILES = (
    ConvTile("GIE_CONVMMA", 64, 64),
    ConvTile("GIE_CONVMMA", 128, 64),
    ConvTile("GIE_CONVMMA", 128, 128, 2, 4),
)
INT8_TILES = (ConvTile("GIE_CONVI8", 64, 64), ConvTile("GIE_CONVI8", 128, 128, 2, 4))


# --------------------------------------------------------------------------- checks


def _output_pixels(layer: Layer, plan: Plan) -> int | None:
    out = static_shape(plan, layer.outputs[0]) if layer.outputs else None
    return None if out is None or len(out) != 4 else out[0] * out[2] * out[3]


def _tile_reason(tile: ConvTile, layer: Layer, plan: Plan, per_group: int) -> str | None:
    """Tiles past the default refuse outputs they would cover less than half of."""
    pixels = _output_pixels(layer, plan)
    if tile.bm > 64 and pixels is not None and pixels <= tile.bm // 2 and per_group <= tile.bn // 2:
        return (
            f"a {tile.bm}x{tile.bn} tile is over twice the {pixels}x{per_group} output per "
            "group in both dimensions (a smaller tile covers it)"
        )
    return None


def _channel_reason(layer: Layer, plan: Plan, vector: int, m_multiple: int) -> str | None:
    g = conv_geometry(layer, plan)
    if isinstance(g, str):
        return g
    group = g["group"]
    if group < 1 or g["c"] % group or g["m"] % group:
        return f"C {g['c']} / M {g['m']} are not multiples of group {group}"
    if group > MAX_GRID_Z:
        return f"group {group} exceeds the grid's z limit {MAX_GRID_Z}"
    cg, mg = g["c"] // group, g["m"] // group
    if cg % vector:
        return f"C / group = {cg} is not a multiple of {vector} (16-byte NHWC channel vectors)"
    if group > 1 and mg % m_multiple:
        return f"M / group = {mg} is not a multiple of {m_multiple} (grouped tensor-core tiles)"
    return None


def f16_check(tile: ConvTile) -> Check:
    """conv_mma_f16.cu: 2-D Conv / gie::ConvAct, C/group % 8, grouped M/group % 8."""
    base = conv_check(8, group="any")

    def check(layer: Layer, plan: Plan) -> str | None:
        reason = base(layer, plan) or _channel_reason(layer, plan, 8, 8)
        if reason is not None:
            return reason
        g = conv_geometry(layer, plan)
        assert not isinstance(g, str)
        return _tile_reason(tile, layer, plan, g["m"] // g["group"])

    return check


def int8_check(tile: ConvTile, output: ir.DataType) -> Check:
    """conv_int8.cu: gie::QConv producing ``output``, int8 activations, C/group % 16,
    K <= 131071, a float32 residual."""
    base = conv_check(16, group="any")

    def check(layer: Layer, plan: Plan) -> str | None:
        reason = int8_activation(layer, plan) or base(layer, plan)
        reason = reason or _channel_reason(layer, plan, 16, 8)
        if reason is not None:
            return reason
        default = int(ir.DataType.INT8) if input_name(layer, 6) else int(ir.DataType.FLOAT)
        produced = ir.DataType(layer.attrs.int("output_dtype", default))
        if produced != output:
            return f"the layer produces {produced.name}, this entry writes {output.name}"
        g = conv_geometry(layer, plan)
        assert not isinstance(g, str)
        depth = g["kh"] * g["kw"] * (g["c"] // g["group"])
        if depth > MAX_INT8_DEPTH:
            return f"K = {depth} exceeds {MAX_INT8_DEPTH} (exact int32 accumulation)"
        residual = plan.specs.get(input_name(layer, 5)) if input_name(layer, 5) else None
        if residual is not None and residual.dtype not in (None, ir.DataType.FLOAT):
            return f"the residual is {residual.dtype.name}; the int8 epilogue adds float32"
        for index, role in ((1, "X_scale"), (3, "W_scale"), (6, "Y_scale")):
            name = input_name(layer, index)
            if name and name not in plan.constants:
                return f"{role} is not a constant"
        return _tile_reason(tile, layer, plan, g["m"] // g["group"])

    return check


# --------------------------------------------------------------------------- lowerings


def _aligned(buffer: DeviceBuffer | None) -> bool:
    return buffer is None or buffer.offset % 16 == 0


def lower_conv_mma_f16(ctx: LowerContext, tile: ConvTile) -> None:
    """conv_mma_f16.cu (Conv / gie::ConvAct, fp16)."""
    weight, bias, residual, epilogue = _conv_parts(ctx)
    if ctx.input_dtype(0) != np.float16:
        raise LoweringError(f"conv_mma_f16 reads fp16, the input is {ctx.input_dtype(0)}")
    n, c, h, w = ctx.input_shape(0)
    m = weight.shape[0]
    groups = ctx.attrs.int("group", 1)
    g = window(ctx, tuple(weight.shape[2:]))  # type: ignore[arg-type]
    krsc = np.ascontiguousarray(weight.transpose(0, 2, 3, 1)).astype(np.float16)
    w_buffer = ctx.weight(f"{ctx.layer.inputs[1]}:krsc:float16", krsc)
    x = ctx.input(0, "nhwc")
    y = ctx.output(0, "nhwc")
    pixels = n * g.oh * g.ow
    args = (
        x, w_buffer, bias, residual, y, n, h, w, c, m, g.oh, g.ow, g.kh, g.kw, g.stride_h,
        g.stride_w, g.pad_top, g.pad_left, g.dil_h, g.dil_w, groups, *epilogue,
    )  # fmt: skip
    if not (_aligned(x) and _aligned(w_buffer)):  # a view cp.async cannot copy: same arguments
        grid = (_ceil(pixels, 64), _ceil(m // groups, 64), groups)
        ctx.launch(FALLBACK_FILE, FALLBACK_ENTRY, grid, (256,), args)
        return
    grid = (_ceil(pixels, tile.bm), _ceil(m // groups, tile.bn), groups)
    ctx.launch(F16_FILE, F16_ENTRY, grid, (tile.threads,), args, tile.defines)


def _scale(ctx: LowerContext, index: int, default: float) -> float:
    if not ctx.has_input(index):
        return default
    value = ctx.constant(index)
    if value is None:
        raise LoweringError(f"input {index} ({ctx.layer.inputs[index]}) must be a constant scale")
    return float(np.asarray(value, dtype=np.float32).reshape(-1)[0])


def _nhwc_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    n, c, h, w = shape
    return (n, h, w, c)


def _transpose_b1(ctx: LowerContext, src: DeviceBuffer, dst: DeviceBuffer, perm: list[int],
                  shape: tuple[int, ...]) -> None:  # fmt: skip
    """data_movement.cu's byte transpose of a contiguous int8 ``shape`` by ``perm``."""
    arguments = dm.transpose_arguments(shape, perm)
    assert arguments is not None  # rank 4
    count, dims, strides = arguments
    ctx.launch(
        dm.FILE,
        "gie_transpose_b1",
        (dm.blocks_for(count),),
        (dm.THREADS,),
        (dm.as_bits(src), dm.as_bits(dst), count, *dims, *strides),
    )


def _int8_input_nhwc(ctx: LowerContext) -> DeviceBuffer:
    """The int8 activation in NHWC: as stored, or transposed here from plain NCHW."""
    shape = ctx.input_shape(0)
    stored_nhwc = ctx.stored_layout(0) == "nhwc" or ctx.constant(0) is not None
    if stored_nhwc or same_bytes_in_both_layouts(shape):
        x = ctx.input(0, "nhwc")
    else:
        plain = ctx.input(0)
        assert plain is not None
        x = ctx.scratch(_nhwc_shape(shape), np.int8, "nhwc")
        _transpose_b1(ctx, plain, x, [0, 2, 3, 1], shape)
    assert x is not None
    return x


def lower_conv_int8(ctx: LowerContext, tile: ConvTile, suffix: str) -> None:
    """conv_int8.cu (gie::QConv): int8 in, int8 / float32 / float16 out."""
    if ctx.input_dtype(0) != np.int8:
        raise LoweringError(f"gie::QConv reads int8 activations, got {ctx.input_dtype(0)}")
    weight = ctx.constant(2)
    if weight is None:
        raise LoweringError("gie::QConv needs a constant int8 weight")
    weight = np.asarray(weight, np.int8)
    n, c, h, w = ctx.input_shape(0)
    m = weight.shape[0]
    groups = ctx.attrs.int("group", 1)
    g = window(ctx, tuple(weight.shape[2:]))  # type: ignore[arg-type]
    krsc = np.ascontiguousarray(weight.transpose(0, 2, 3, 1))
    w_buffer = ctx.weight(f"{ctx.layer.inputs[2]}:krsc:int8", krsc)
    scales = ctx.constant(3)
    if scales is None:
        raise LoweringError("gie::QConv needs constant weight scales")
    scales = np.asarray(scales, np.float32).reshape(-1)
    w_scale = ctx.weight(f"{ctx.layer.inputs[3]}:wscale", scales)
    bias = None
    bias_value = ctx.constant(4)
    if bias_value is not None:
        bias = ctx.weight(f"{ctx.layer.inputs[4]}:s32", np.asarray(bias_value, np.int32).reshape(m))
    elif ctx.has_input(4):
        bias = ctx.input(4)
    residual = ctx.input(5, "nhwc")
    if residual is not None and residual.dtype != "float32":
        raise LoweringError(f"the int8 epilogue adds a float32 residual, got {residual.dtype}")
    code, alpha, beta, first = _conv_epilogue(ctx)
    x = _int8_input_nhwc(ctx)
    if not (_aligned(x) and _aligned(w_buffer)):
        raise LoweringError("conv_int8 needs 16-byte aligned input and weight (cp.async)")
    out_shape = ctx.output_shape(0)
    staged_from: DeviceBuffer | None = None
    try:
        y = ctx.output(0, "nhwc")
    except LoweringError:  # an int8 graph output: no layout kernel for bytes, transpose here
        staged_from = ctx.output(0, "plain")
        y = ctx.scratch(_nhwc_shape(out_shape), staged_from.dtype, "nhwc")
    pixels = n * g.oh * g.ow
    args = (
        x, w_buffer, bias, w_scale, residual, y, n, h, w, c, m, g.oh, g.ow, g.kh, g.kw,
        g.stride_h, g.stride_w, g.pad_top, g.pad_left, g.dil_h, g.dil_w, groups,
        _scale(ctx, 1, 1.0), 1 if scales.size > 1 else 0, _scale(ctx, 6, 1.0), code, alpha, beta,
        first,
    )  # fmt: skip
    grid = (_ceil(pixels, tile.bm), _ceil(m // groups, tile.bn), groups)
    ctx.launch(INT8_FILE, f"gie_conv_int8_{suffix}", grid, (tile.threads,), args, tile.defines)
    if staged_from is not None:
        _transpose_b1(ctx, y, staged_from, [0, 3, 1, 2], _nhwc_shape(out_shape))


def _conv_epilogue(ctx: LowerContext) -> tuple[int, float, float, int]:
    code, alpha, beta = activation_arguments(ctx.attrs)
    return code, alpha, beta, ctx.attrs.int("residual_before_activation", 1)


# --------------------------------------------------------------------------- tables


def _f16_name(tile: ConvTile) -> str:
    return f"conv_mma_f16_{tile.bm}x{tile.bn}"


def _int8_name(tile: ConvTile, suffix: str) -> str:
    return f"conv_imma_{suffix}_{tile.bm}x{tile.bn}"


def _bind_f16(tile: ConvTile) -> LowerFunction:
    def lower(ctx: LowerContext) -> None:
        lower_conv_mma_f16(ctx, tile)

    return lower


def _bind_int8(tile: ConvTile, suffix: str) -> LowerFunction:
    def lower(ctx: LowerContext) -> None:
        lower_conv_int8(ctx, tile, suffix)

    return lower


TACTICS: list[CudaTactic] = [
    *(
        CudaTactic(_f16_name(t), "conv_implicit_gemm", CONV_OPS, F16_FILE, F16_ENTRY, t.defines,
                   f16_check(t), (8, 0), F16S, F16_ONLY)
        for t in F16_TILES
    ),
    *(
        CudaTactic(_int8_name(t, s), "conv_implicit_gemm", QCONV_OPS, INT8_FILE,
                   f"gie_conv_int8_{s}", t.defines, int8_check(t, out), (8, 0), I8S, I8_ONLY)
        for t in INT8_TILES
        for s, out in INT8_OUTPUTS.items()
    ),
]  # fmt: skip

LOWERINGS: dict[str, LowerFunction] = {
    **{_f16_name(t): _bind_f16(t) for t in F16_TILES},
    **{_int8_name(t, s): _bind_int8(t, s) for t in INT8_TILES for s in INT8_OUTPUTS},
}

__all__ = [
    "F16_TILES",
    "INT8_TILES",
    "LOWERINGS",
    "TACTICS",
    "ConvTile",
    "f16_check",
    "int8_check",
    "lower_conv_int8",
    "lower_conv_mma_f16",
]
