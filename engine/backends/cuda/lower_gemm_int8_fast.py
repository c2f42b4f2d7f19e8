"""Tactics and lowering of the pipelined int8 IMMA GEMM (kernels/gemm_int8_pipelined.cu) for
gie::QGemm with a constant weight.

The kernel has gemm_int8.cu's requantizing epilogue (saturating int32 bias, per-channel or
per-tensor weight scale, activation, residual before or after it; int8 / float32 / float16
output) but reads B transposed: the constant weight is uploaded once as Bt [N, K] int8 row-major
(transposed first unless ``transB``), so both operands are K-contiguous. Two tile variants
(``-D`` defines): 128 x 128 x 64 with 8 warps and 64 x 64 x 64 with 4 warps, 3 stages; each
launch passes its dynamic shared memory ``STAGES * (BM + BN) * BK`` bytes.

Constraints (checked before selection): int8_gemm_check (int8 activations, K <= 131071, the
layer's output dtype, a supported epilogue), K % 16 == 0 (16-byte cp.async rows), a constant
weight, constant scales and bias, and no 128 x 128 tile over twice the output in both
dimensions (the 64 x 64 tile takes those). Operand offsets that are not 16-byte
aligned (a view into another buffer) fall back at lowering to gemm_int8.cu.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from engine.backends.cuda.lower_gemm import (
    ceil_div,
    constant_scalar,
    epilogue_arguments,
    is_matmul_kind,
)
from engine.backends.cuda.lower_gemm_fast import PipelinedTile
from engine.backends.cuda.lowering import LowerContext, LowerFunction, LoweringError
from engine.backends.cuda.tactic_checks import Check, gemm_dims, input_name, int8_gemm_check
from engine.backends.cuda.tactics import I8_ONLY, I8S, CudaTactic
from engine.build.plan import Layer, Plan

KERNEL_FILE = "gemm_int8_pipelined.cu"
FALLBACK_FILE = "gemm_int8.cu"
#: Largest grid y (tile rows).
MAX_GRID_Y = 65535
#: output suffix -> ONNX dtype of the layer's output
OUTPUTS = {"s8": ir.DataType.INT8, "f32": ir.DataType.FLOAT, "f16": ir.DataType.FLOAT16}


#: 8 warps of 64 x 32 on 128 x 128 (48 KB), 4 warps of 32 x 32 on 64 x 64 (24 KB).
TILES: tuple[PipelinedTile, ...] = (
    PipelinedTile(128, 128, 64, 3, 2, 4, macro="GIE_I8P", element_bytes=1),
    PipelinedTile(64, 64, 64, 3, 2, 2, macro="GIE_I8P", element_bytes=1),
)


def tactic_name(suffix: str, tile: PipelinedTile) -> str:
    return f"gemm_imma_pipelined_{suffix}_{tile.label}"


def pipelined_int8_check(output: ir.DataType, tile: PipelinedTile) -> Check:
    """int8_gemm_check plus K % 16 == 0, a constant weight, no tile over twice the output."""
    base = int8_gemm_check(output)

    def check(layer: Layer, plan: Plan) -> str | None:
        if layer.op_type != "QGemm":
            return "only gie::QGemm (QMatMul runs gemm_int8.cu)"
        reason = base(layer, plan)
        if reason is not None:
            return reason
        if input_name(layer, 2) not in plan.constants:
            return "the weight is not a constant (uploaded once transposed as Bt [N, K])"
        for index in (1, 3, 4, 6):  # x_scale, w_scale, bias, y_scale: read at lowering
            name = input_name(layer, index)
            if name and name not in plan.constants:
                return f"input {index} ({name}) must be a constant"
        dims = gemm_dims(layer, plan)
        if isinstance(dims, str):
            return dims
        batch, m, n, k = dims
        if batch != 1:
            return "a batched B"
        if k % 16:
            return f"K = {k}: K must be a multiple of 16 (16-byte cp.async rows)"
        if ceil_div(m, tile.bm) > MAX_GRID_Y:
            return f"M = {m} needs more than {MAX_GRID_Y} tile rows of {tile.bm}"
        if tile.bm > 64 and m <= tile.bm // 2 and n <= tile.bn // 2:
            return (
                f"a {tile.bm}x{tile.bn} tile is over twice the {m}x{n} output in both "
                "dimensions (a smaller tile covers it)"
            )
        return None

    return check


def _aligned(*buffers: object) -> bool:
    return all(b is None or getattr(b, "offset", 0) % 16 == 0 for b in buffers)


def lower_pipelined_int8_gemm(ctx: LowerContext, tile: PipelinedTile, suffix: str) -> None:
    """gie::QGemm with gemm_int8_pipelined.cu at ``tile`` (entry ``_<suffix>``)."""
    if ctx.layer.op_type != "QGemm":
        raise LoweringError(f"{ctx.layer.op_type}: the pipelined int8 GEMM runs gie::QGemm")
    a_shape, b_shape = ctx.input_shape(0), ctx.input_shape(2)
    trans_b = 0 if is_matmul_kind(ctx) else ctx.attrs.int("transB", 0)
    b_2d = b_shape[-2:] if len(b_shape) > 2 and math.prod(b_shape[:-2]) == 1 else b_shape
    if len(b_2d) != 2:
        raise LoweringError(f"B of shape {list(b_shape)} is not a matrix")
    k, n = (b_2d[1], b_2d[0]) if trans_b else (b_2d[0], b_2d[1])
    m = math.prod(a_shape[:-1]) if len(a_shape) > 1 else 1
    if a_shape[-1] != k:
        raise LoweringError(f"A {list(a_shape)} and B {list(b_shape)} disagree on K")
    weight = ctx.constant(2)
    if weight is None:
        raise LoweringError("gie::QGemm needs a constant int8 weight")
    matrix = np.asarray(weight, np.int8).reshape(b_2d)
    bt_host = np.ascontiguousarray(matrix if trans_b else matrix.T)  # [N, K]
    bt = ctx.weight(f"{ctx.layer.inputs[2]}:s8:nk", bt_host)
    a = ctx.input(0)
    assert a is not None
    a = a.with_shape((m, k))
    x_scale = constant_scalar(ctx, 1, 1.0)
    scales = ctx.constant(3)
    if scales is None:
        raise LoweringError("gie::QGemm needs constant weight scales")
    scales = np.asarray(scales, np.float32).reshape(-1)
    w_scale = ctx.weight(f"{ctx.layer.inputs[3]}:wscale", scales)
    w_stride = 1 if scales.size > 1 else 0
    bias = None
    if ctx.has_input(4):
        bias_value = ctx.constant(4)
        if bias_value is None:
            raise LoweringError("gie::QGemm needs a constant int32 bias")
        bias = ctx.weight(
            f"{ctx.layer.inputs[4]}:s32", np.asarray(bias_value, np.int32).reshape(-1)
        )
    residual = ctx.input(5)
    if residual is not None:
        if residual.dtype != "float32":
            raise LoweringError(f"the int8 epilogue adds a float32 residual, got {residual.dtype}")
        residual = residual.with_shape((m, n))
    y_scale = constant_scalar(ctx, 6, 1.0)
    out = ctx.output(0).with_shape((m, n))
    code, alpha, beta, first = epilogue_arguments(ctx)
    entry = f"gie_gemm_int8_pipelined_{suffix}"
    if k % 16 or not _aligned(a, bt):
        # gemm_int8.cu: same epilogue, any K and alignment (Bt through strides (1, K)).
        args = (
            a, bt, bias, w_scale, residual, out, m, n, k, k, 1, k, n, 0, 0, 0,
            x_scale, w_stride, y_scale, code, alpha, beta, first,
        )  # fmt: skip
        ctx.launch(
            FALLBACK_FILE, f"gie_gemm_int8_{suffix}", (ceil_div(n, 8), ceil_div(m, 16)), (32,), args
        )
        return
    args = (
        a, bt, bias, w_scale, residual, out, m, n, k, k, k, n,
        x_scale, w_stride, y_scale, code, alpha, beta, first,
    )  # fmt: skip
    ctx.launch(
        KERNEL_FILE,
        entry,
        tile.grid(m, n),
        (tile.threads,),
        args,
        tile.defines,
        shared_bytes=tile.shared_bytes,
    )


def _bind(tile: PipelinedTile, suffix: str) -> LowerFunction:
    def lower(ctx: LowerContext) -> None:
        lower_pipelined_int8_gemm(ctx, tile, suffix)

    return lower


TACTICS: list[CudaTactic] = [
    CudaTactic(
        tactic_name(suffix, tile),
        "gemm_int8",
        frozenset({"gie::QGemm"}),
        KERNEL_FILE,
        f"gie_gemm_int8_pipelined_{suffix}",
        tile.defines,
        pipelined_int8_check(dtype, tile),
        (8, 0),
        I8S,
        I8_ONLY,
    )
    for suffix, dtype in OUTPUTS.items()
    for tile in TILES
]

LOWERINGS: dict[str, LowerFunction] = {
    tactic_name(suffix, tile): _bind(tile, suffix) for suffix in OUTPUTS for tile in TILES
}

__all__ = ["LOWERINGS", "TACTICS", "TILES", "lower_pipelined_int8_gemm"]
