"""Lowerings of the GEMM tactics: SIMT and tensor-core GEMMs with the fused epilogue, the
strided batched GEMM (attention), the int8 IMMA GEMM (gie::QGemm / gie::QMatMul) and cuBLAS.

GEMM layers read their operands in plain layout. A constant B is uploaded once as a row-major
[K, N] weight (transposed first when ``transB``), a constant bias as N values of the layer's
dtype. The epilogue arguments come from
:func:`engine.backends.cuda.activations.activation_arguments`.
"""

from __future__ import annotations

import math

import numpy as np

from engine.backends.cuda.activations import activation_arguments
from engine.backends.cuda.launch_plan import DeviceBuffer
from engine.backends.cuda.lowering import LowerContext, LowerFunction, LoweringError
from engine.backends.cuda.tactics import CATALOGUE, CudaTactic


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def is_matmul_kind(ctx: LowerContext) -> bool:
    op = ctx.layer.op_type
    return op == "MatMul" or (
        op in ("GemmAct", "QGemm") and ctx.attrs.str("kind", "Gemm") == "MatMul"
    )


def epilogue_arguments(ctx: LowerContext) -> tuple[int, float, float, int]:
    if ctx.layer.op_type in ("GemmAct", "ConvAct", "QGemm", "QConv"):
        code, alpha, beta = activation_arguments(ctx.attrs)
    else:
        code, alpha, beta = 0, 0.0, 0.0
    return code, alpha, beta, ctx.attrs.int("residual_before_activation", 1)


def gemm_operands(
    ctx: LowerContext, b_index: int = 1
) -> tuple[DeviceBuffer, DeviceBuffer, int, int, int]:
    """(A as [M, K], B as row-major [K, N], M, N, K) of a MatMul / Gemm / gie::GemmAct layer
    whose B is 2-D (a constant B is uploaded once, transposed when ``transB``)."""
    a_shape, b_shape = ctx.input_shape(0), ctx.input_shape(b_index)
    trans_b = 0 if is_matmul_kind(ctx) else ctx.attrs.int("transB", 0)
    b_2d = b_shape[-2:] if len(b_shape) > 2 and math.prod(b_shape[:-2]) == 1 else b_shape
    if len(b_2d) != 2:
        raise LoweringError(f"B of shape {list(b_shape)} is not a matrix")
    k, n = (b_2d[1], b_2d[0]) if trans_b else (b_2d[0], b_2d[1])
    m = math.prod(a_shape[:-1]) if len(a_shape) > 1 else 1
    if a_shape[-1] != k:
        raise LoweringError(f"A {list(a_shape)} and B {list(b_shape)} disagree on K")
    a = ctx.input(0)
    assert a is not None
    weight = ctx.constant(b_index)
    if weight is not None:
        array = np.asarray(weight).reshape(b_2d)
        array = array.T if trans_b else array
        b = ctx.weight(
            f"{ctx.layer.inputs[b_index]}:kn:{ctx.input_dtype(0)}", array.astype(ctx.input_dtype(0))
        )
    else:
        if trans_b:
            raise LoweringError("transB with a non-constant B")
        got = ctx.input(b_index)
        assert got is not None
        b = got.with_shape((k, n))
    return a.with_shape((m, k)), b, m, n, k


def bias_operand(ctx: LowerContext, index: int, n: int, dtype: np.dtype) -> DeviceBuffer | None:
    if not ctx.has_input(index):
        return None
    value = ctx.constant(index)
    if value is not None:
        array = np.broadcast_to(np.asarray(value).reshape(-1), (n,)).astype(dtype)
        return ctx.weight(f"{ctx.layer.inputs[index]}:bias{n}:{dtype}", array)
    buffer = ctx.input(index)
    assert buffer is not None
    if buffer.size != n:
        raise LoweringError(f"bias of {buffer.size} values for {n} columns")
    return buffer.with_shape((n,))


def lower_own_gemm(ctx: LowerContext, tactic: CudaTactic) -> None:
    """gemm_simt.cu / gemm_mma_f16.cu: C = epilogue(A @ B + bias)."""
    a, b, m, n, k = gemm_operands(ctx)
    dtype = ctx.input_dtype(0)
    bias = bias_operand(ctx, 2, n, dtype) if ctx.layer.op_type in ("Gemm", "GemmAct") else None
    residual = ctx.input(3) if ctx.layer.op_type == "GemmAct" else None
    out = ctx.output(0)
    code, alpha, beta, first = epilogue_arguments(ctx)
    res = None if residual is None else residual.with_shape((m, n))
    args = (a, b, bias, res, out.with_shape((m, n)), m, n, k, k, n, n, code, alpha, beta, first)
    if "mma" in tactic.entry:
        grid, block = (ceil_div(n, 8), ceil_div(m, 16)), (32,)
    else:
        defines = dict(tactic.defines)
        bm, bn = defines.get("GIE_GEMM_BM", 64), defines.get("GIE_GEMM_BN", 64)
        grid, block = (ceil_div(n, bn), ceil_div(m, bm)), (256,)
    ctx.launch(tactic.kernel_file, tactic.entry, grid, block, args, tactic.defines)


def batch_strides(
    ctx: LowerContext, a_index: int, b_index: int
) -> tuple[int, int, int, int, int, int]:
    """(batch, M, N, K, batch_a, batch_b) of a batched MatMul (batch dims equal or one side 1)."""
    a_shape, b_shape = ctx.input_shape(a_index), ctx.input_shape(b_index)
    out = ctx.output_shape(0)
    m, k = a_shape[-2], a_shape[-1]
    n = b_shape[-1]
    batch = math.prod(out[:-2])
    batch_a = m * k if math.prod(a_shape[:-2]) > 1 else 0
    batch_b = k * n if math.prod(b_shape[:-2]) > 1 else 0
    return batch, m, n, k, batch_a, batch_b


def lower_batched(ctx: LowerContext, tactic: CudaTactic) -> None:
    """gemm_batched.cu: C[z] = A[z] @ B[z] (scale 1)."""
    batch, m, n, k, batch_a, batch_b = batch_strides(ctx, 0, 1)
    a, b, out = ctx.input(0), ctx.input(1), ctx.output(0)
    args = (a, b, out, m, n, k, k, n, 1, n, batch_a, batch_b, m * n, 1.0)
    if "mma" in tactic.entry:
        grid, block = (ceil_div(n, 8), ceil_div(m, 16), batch), (32,)
    else:
        grid, block = (ceil_div(n, 32), ceil_div(m, 32), batch), (256,)
    ctx.launch(tactic.kernel_file, tactic.entry, grid, block, args)


def constant_scalar(ctx: LowerContext, index: int, default: float) -> float:
    if not ctx.has_input(index):
        return default
    value = ctx.constant(index)
    if value is None:
        raise LoweringError(f"input {index} ({ctx.layer.inputs[index]}) must be a constant scale")
    return float(np.asarray(value, dtype=np.float32).reshape(-1)[0])


def lower_int8_gemm(ctx: LowerContext, tactic: CudaTactic) -> None:
    """gemm_int8.cu: gie::QGemm (per-channel w_scale, int32 bias, epilogue) and gie::QMatMul."""
    x_scale = constant_scalar(ctx, 1, 1.0)
    if ctx.layer.op_type == "QMatMul":
        batch, m, n, k, batch_a, batch_b = batch_strides(ctx, 0, 2)
        a, b = ctx.input(0), ctx.input(2)
        w_scale = ctx.weight(
            f"qmm:{ctx.layer.name}:wscale", np.asarray([constant_scalar(ctx, 3, 1.0)], np.float32)
        )
        bias = residual = None
        y_scale = constant_scalar(ctx, 4, 1.0)
        b_stride_k, b_stride_n, ldc, w_stride = n, 1, n, 0
        code, alpha, beta, first = 0, 0.0, 0.0, 1
    else:
        batch, batch_a, batch_b = 1, 0, 0
        a_shape, b_shape = ctx.input_shape(0), ctx.input_shape(2)
        trans_b = 0 if is_matmul_kind(ctx) else ctx.attrs.int("transB", 0)
        k, n = (b_shape[1], b_shape[0]) if trans_b else (b_shape[0], b_shape[1])
        m = math.prod(a_shape[:-1])
        a = ctx.input(0)
        weight = ctx.constant(2)
        if weight is None:
            raise LoweringError("gie::QGemm needs a constant int8 weight")
        b = ctx.weight(f"{ctx.layer.inputs[2]}:s8", np.asarray(weight, np.int8))
        b_stride_k, b_stride_n = (1, k) if trans_b else (n, 1)
        scales = ctx.constant(3)
        if scales is None:
            raise LoweringError("gie::QGemm needs constant weight scales")
        scales = np.asarray(scales, np.float32).reshape(-1)
        w_scale = ctx.weight(f"{ctx.layer.inputs[3]}:wscale", scales)
        w_stride = 1 if scales.size > 1 else 0
        bias_value = ctx.constant(4)
        bias = None
        if bias_value is not None:
            bias = ctx.weight(
                f"{ctx.layer.inputs[4]}:s32", np.asarray(bias_value, np.int32).reshape(-1)
            )
        residual = ctx.input(5)
        if residual is not None and residual.dtype != "float32":
            raise LoweringError(f"the int8 epilogue adds a float32 residual, got {residual.dtype}")
        y_scale = constant_scalar(ctx, 6, 1.0)
        ldc = n
        code, alpha, beta, first = epilogue_arguments(ctx)
    out = ctx.output(0)
    args = (
        a, b, bias, w_scale, residual, out, m, n, k, k, b_stride_k, b_stride_n, ldc,
        batch_a, batch_b, m * n, x_scale, w_stride, y_scale, code, alpha, beta, first,
    )  # fmt: skip
    ctx.launch(
        tactic.kernel_file, tactic.entry, (ceil_div(n, 8), ceil_div(m, 16), batch), (32,), args
    )


def lower_sparse(ctx: LowerContext, tactic: CudaTactic) -> None:
    """gemm_sparse.cu: the 2:4 weight W [out, K] compressed once (engine.sparsity.compress) is
    the kernel's A; the activation rows are B through strides and the output C^T likewise, so a
    linear layer Y = X @ W^T needs no transpose."""
    from engine.sparsity.compress import compress_2_4

    int8 = ctx.layer.op_type == "QGemm"
    w_index = 2 if int8 else 1
    weight = ctx.constant(w_index)
    if weight is None:
        raise LoweringError("the 2:4 weight is not a constant")
    weight = np.asarray(weight)
    trans_b = 0 if is_matmul_kind(ctx) else ctx.attrs.int("transB", 0)
    matrix = weight.reshape(weight.shape[-2:]) if weight.ndim > 2 else weight
    matrix = matrix if trans_b else matrix.T  # [out, K]
    out_channels, k = matrix.shape
    dtype = np.dtype(np.int8) if int8 else ctx.input_dtype(0)
    packed = compress_2_4(matrix, dtype=dtype)
    key = f"{ctx.layer.inputs[w_index]}:sparse:{dtype}"
    values = ctx.weight(key + ":values", np.ascontiguousarray(packed.values))
    metadata = ctx.weight(
        key + ":meta", np.ascontiguousarray(packed.metadata).reshape(-1).view(np.uint32)
    )
    rows_p = int(packed.values.shape[0])
    a_shape = ctx.input_shape(0)
    rows = math.prod(a_shape[:-1])
    x = ctx.input(0)
    out = ctx.output(0)
    assert x is not None
    code, alpha, beta, first = epilogue_arguments(ctx)
    geometry = (out_channels, rows, k, rows_p, 1, k, 1, out_channels)
    if int8:
        scales = ctx.constant(3)
        if scales is None:
            raise LoweringError("gie::QGemm needs constant weight scales")
        scales = np.asarray(scales, np.float32).reshape(-1)
        w_scale = ctx.weight(f"{ctx.layer.inputs[3]}:wscale", scales)
        bias_value = ctx.constant(4)
        bias = None
        if bias_value is not None:
            bias = ctx.weight(
                f"{ctx.layer.inputs[4]}:s32", np.asarray(bias_value, np.int32).reshape(-1)
            )
        args = (
            values, metadata, x, bias, w_scale, ctx.input(5), out, *geometry,
            constant_scalar(ctx, 1, 1.0), int(scales.size > 1), constant_scalar(ctx, 6, 1.0),
            code, alpha, beta, first,
        )  # fmt: skip
    else:
        bias = bias_operand(ctx, 2, out_channels, dtype) if ctx.layer.op_type != "MatMul" else None
        residual = ctx.input(3) if ctx.layer.op_type == "GemmAct" else None
        args = (values, metadata, x, bias, residual, out, *geometry, code, alpha, beta, first)
    grid = (ceil_div(rows, 8), ceil_div(out_channels, 16))
    ctx.launch(tactic.kernel_file, tactic.entry, grid, (32,), args)


def _bind(function, tactic: CudaTactic) -> LowerFunction:  # type: ignore[no-untyped-def]
    def lower(ctx: LowerContext) -> None:
        function(ctx, tactic)

    return lower


def _lowering_for(tactic: CudaTactic) -> LowerFunction | None:
    if tactic.family in ("gemm_simt", "gemm_tensor_core"):
        return _bind(lower_own_gemm, tactic)
    if tactic.family == "gemm_batched":
        return _bind(lower_batched, tactic)
    if tactic.family == "gemm_int8":
        return _bind(lower_int8_gemm, tactic)
    if tactic.family == "sparse":
        return _bind(lower_sparse, tactic)
    return None


LOWERINGS: dict[str, LowerFunction] = {
    t.name: f for t in CATALOGUE if (f := _lowering_for(t)) is not None
}
TACTICS: list[CudaTactic] = []
