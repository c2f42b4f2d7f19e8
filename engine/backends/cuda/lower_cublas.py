"""Lowerings of the cuBLAS library tactics: ``gemmEx`` / ``gemmStridedBatchedEx`` through CuPy
(fp32, TF32, fp16 with fp32 accumulation, int8 with an int32 accumulator), with the epilogue as
our own kernels: bias + activation in place (elementwise.cu), a residual through beta = 1, the
int8 layers' requantization (requant_epilogue.cu, bit-exact with gie::QGemm), and convolution
as NHWC im2col (data_movement.cu) + one GEMM against the KRSC weight.
"""

from __future__ import annotations

import math

import numpy as np

from engine.backends.cuda.launch_plan import DeviceBuffer, LibraryGemm
from engine.backends.cuda.lower_gemm import (
    batch_strides,
    bias_operand,
    ceil_div,
    constant_scalar,
    epilogue_arguments,
    gemm_operands,
    is_matmul_kind,
)
from engine.backends.cuda.lowering import LowerContext, LowerFunction, LoweringError
from engine.backends.cuda.tactics import CATALOGUE, CudaTactic

COMPUTE = {"cublas_fp32": "fp32", "cublas_tf32": "tf32", "cublas_fp16": "fp16"}


def lower_cublas(ctx: LowerContext, tactic: CudaTactic) -> None:
    """cuBLAS gemmEx (strided batched when both operands are batched); bias + activation then
    run in place through elementwise.cu, a residual enters as C with beta = 1."""
    dtype = ctx.input_dtype(0)
    out = ctx.output(0)
    b_shape = ctx.input_shape(1)
    if len(b_shape) > 2 and math.prod(b_shape[:-2]) > 1:
        batch, m, n, k, batch_a, batch_b = batch_strides(ctx, 0, 1)
        a, b = ctx.input(0), ctx.input(1)
        assert a is not None and b is not None
        bias = residual = None
    else:
        a, b, m, n, k = gemm_operands(ctx)
        batch, batch_a, batch_b = 1, 0, 0
        bias = bias_operand(ctx, 2, n, dtype) if ctx.layer.op_type in ("Gemm", "GemmAct") else None
        residual = ctx.input(3) if ctx.layer.op_type == "GemmAct" else None
    beta = 0.0
    if residual is not None:
        ctx.copy(residual, out)
        beta = 1.0
    ctx.steps.append(
        LibraryGemm(
            a,
            b,
            out,
            m,
            n,
            k,
            batch,
            k,
            n,
            n,
            batch_a,
            batch_b,
            m * n,
            1.0,
            beta,
            COMPUTE[tactic.name],
        )
    )
    code, alpha, act_beta, _ = epilogue_arguments(ctx)
    if bias is not None or code:
        suffix = "f16" if dtype == np.float16 else "f32"
        total = m * n * batch
        view = out.with_shape((total // n, n))
        ctx.launch(
            "elementwise.cu",
            f"gie_bias_act_{suffix}",
            (min(ceil_div(total, 256), 4096),),
            (256,),
            (view, bias, view, total // n, n, code, alpha, act_beta),
        )


def lower_cublas_int8(ctx: LowerContext, tactic: CudaTactic) -> None:
    """gie::QGemm as a cuBLAS int8 GEMM (int32 accumulator in scratch), then
    requant_epilogue.cu: the same epilogue as gemm_int8.cu, bit for bit."""
    a_shape, b_shape = ctx.input_shape(0), ctx.input_shape(2)
    trans_b = 0 if is_matmul_kind(ctx) else ctx.attrs.int("transB", 0)
    k, n = (b_shape[1], b_shape[0]) if trans_b else (b_shape[0], b_shape[1])
    m = math.prod(a_shape[:-1])
    weight, scales = ctx.constant(2), ctx.constant(3)
    if weight is None or scales is None:
        raise LoweringError("gie::QGemm needs a constant int8 weight and weight scales")
    array = np.asarray(weight, np.int8)
    b = ctx.weight(
        f"{ctx.layer.inputs[2]}:s8:kn", np.ascontiguousarray(array.T if trans_b else array)
    )
    scales = np.asarray(scales, np.float32).reshape(-1)
    w_scale = ctx.weight(f"{ctx.layer.inputs[3]}:wscale", scales)
    a = ctx.input(0)
    assert a is not None
    acc = ctx.scratch((m, n), np.int32)
    ctx.steps.append(
        LibraryGemm(a.with_shape((m, k)), b, acc, m, n, k, 1, k, n, n, 0, 0, 0, 1.0, 0.0, "int8")
    )
    bias_value = ctx.constant(4)
    bias = None
    if bias_value is not None:
        bias = ctx.weight(
            f"{ctx.layer.inputs[4]}:s32", np.asarray(bias_value, np.int32).reshape(-1)
        )
    residual = ctx.input(5)
    code, alpha, beta, first = epilogue_arguments(ctx)
    out = ctx.output(0)
    args = (
        acc, bias, w_scale, residual, out, m, n, constant_scalar(ctx, 1, 1.0), int(scales.size > 1),
        constant_scalar(ctx, 6, 1.0), code, alpha, beta, first,
    )  # fmt: skip
    grid = (max(1, min(ceil_div(m * n, 256), 4096)),)
    ctx.launch(tactic.kernel_file, tactic.entry, grid, (256,), args)


def lower_im2col_cublas(ctx: LowerContext, tactic: CudaTactic) -> None:
    """Convolution as im2col (data_movement.cu, NHWC) + one cuBLAS GEMM with the KRSC weight,
    then the epilogue: bias + activation in place, the residual through beta = 1 (before the
    activation) or a generated add (after it)."""
    from engine.backends.cuda.lower_conv import stride_grid, window
    from engine.backends.cuda.pointwise_codegen import generate

    weight = ctx.constant(1)
    if weight is None:
        raise LoweringError("the convolution weight is not a constant")
    dtype = ctx.input_dtype(0)
    n, c, h, w = ctx.input_shape(0)
    m, _, kh, kw = weight.shape
    g = window(ctx, (kh, kw))
    pixels, depth = n * g.oh * g.ow, kh * kw * c
    krsc = np.ascontiguousarray(np.asarray(weight).transpose(0, 2, 3, 1).reshape(m, depth).T)
    b = ctx.weight(f"{ctx.layer.inputs[1]}:im2col_km:{dtype}", krsc.astype(dtype))
    x = ctx.input(0, "nhwc")
    col = ctx.scratch((pixels, depth), dtype)
    args = (
        x, col, n, h, w, c, kh, kw, g.oh, g.ow, g.stride_h, g.stride_w, g.pad_top, g.pad_left,
        g.dil_h, g.dil_w, 0, c, depth,
    )  # fmt: skip
    ctx.launch(tactic.kernel_file, tactic.entry, stride_grid(pixels * depth), (256,), args)
    y = ctx.output(0, "nhwc")
    flat = DeviceBuffer(y.region, y.offset, y.dtype, (pixels, m))
    fused = ctx.layer.op_type == "ConvAct"
    residual = ctx.input(3, "nhwc") if fused else None
    code, alpha, act_beta, first = epilogue_arguments(ctx)
    beta = 0.0
    if residual is not None and (first or not code):
        ctx.copy(residual, y)
        beta = 1.0
    compute = (
        "fp16" if dtype == np.float16 else ("tf32" if tactic.precisions == {"tf32"} else "fp32")
    )
    ctx.steps.append(
        LibraryGemm(col, b, flat, pixels, m, depth, 1, depth, m, m, 0, 0, 0, 1.0, beta, compute)
    )
    bias = bias_operand(ctx, 2, m, dtype)
    suffix = "f16" if dtype == np.float16 else "f32"
    if bias is not None or code:
        view = (flat, bias, flat, pixels, m, code, alpha, act_beta)
        ctx.launch(
            "elementwise.cu", f"gie_bias_act_{suffix}", stride_grid(pixels * m), (256,), view
        )
    if residual is not None and beta == 0.0:
        kernel = generate("add(x0, x1)", [dtype, dtype], dtype, 1)
        res = DeviceBuffer(residual.region, residual.offset, residual.dtype, (pixels, m))
        ctx.launch(
            None, kernel.contiguous_entry, stride_grid(pixels * m), (256,),
            (flat, res, flat, pixels * m), text=kernel.source,
        )  # fmt: skip


def _bind(function, tactic: CudaTactic) -> LowerFunction:  # type: ignore[no-untyped-def]
    def lower(ctx: LowerContext) -> None:
        function(ctx, tactic)

    return lower


def _lowering_for(tactic: CudaTactic) -> LowerFunction | None:
    if tactic.name in COMPUTE:
        return _bind(lower_cublas, tactic)
    if tactic.name.startswith("cublas_int8"):
        return _bind(lower_cublas_int8, tactic)
    if tactic.name.startswith("im2col_cublas"):
        return _bind(lower_im2col_cublas, tactic)
    return None


LOWERINGS: dict[str, LowerFunction] = {
    t.name: f for t in CATALOGUE if (f := _lowering_for(t)) is not None
}
TACTICS: list[CudaTactic] = []
