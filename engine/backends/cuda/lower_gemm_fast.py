"""Tactics and lowering of the pipelined tensor-core fp16 GEMM (kernels/gemm_mma_pipelined.cu).

The kernel has gemm_mma_f16.cu's arguments and epilogue (MatMul / Gemm / gie::GemmAct: bias,
activation, residual before or after it), so the operands come from the same helpers as
:mod:`engine.backends.cuda.lower_gemm` (a constant B uploaded once as row-major [K, N]). Tile
variants are ``-D`` defines (BM x BN x BK, pipeline stages, warps); each launch passes its
dynamic shared memory ``STAGES * (BM * BK + BK * BN) * 2`` bytes (over 48 KB the device raises
the function's max-dynamic-shared-memory attribute when it loads the kernel).

Constraints (checked before selection): fp16, K % 8 == 0 and N % 8 == 0 (16-byte cp.async rows),
no batch, grid rows ceil(M / BM) <= 65535. Operand offsets that are not 16-byte aligned (a view
into another buffer) fall back at lowering to gemm_mma_f16.cu, which has no such requirement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.backends.cuda.lower_gemm import (
    bias_operand,
    ceil_div,
    epilogue_arguments,
    gemm_operands,
)
from engine.backends.cuda.lowering import LowerContext, LowerFunction, LoweringError
from engine.backends.cuda.tactic_checks import Check, check_own_gemm, gemm_dims
from engine.backends.cuda.tactics import F16_ONLY, F16S, GEMM_OPS, CudaTactic
from engine.build.plan import Layer, Plan

KERNEL_FILE = "gemm_mma_pipelined.cu"
ENTRY = "gie_gemm_mma_pipelined_f16"
FALLBACK_FILE, FALLBACK_ENTRY = "gemm_mma_f16.cu", "gie_gemm_mma_f16"
#: Largest grid y (tile rows).
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class PipelinedTile:
    """One tile variant of a pipelined tensor-core GEMM (gemm_mma_pipelined.cu, and with
    ``macro="GIE_I8P"``, ``element_bytes=1`` gemm_int8_pipelined.cu): block tile bm x bn in
    steps of bk, ``stages`` cp.async stages, warps_m x warps_n warps."""

    bm: int
    bn: int
    bk: int
    stages: int
    warps_m: int
    warps_n: int
    macro: str = "GIE_PIPE"
    element_bytes: int = 2

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory per block: every stage of the A and B tiles."""
        return self.stages * (self.bm * self.bk + self.bk * self.bn) * self.element_bytes

    @property
    def label(self) -> str:
        return f"{self.bm}x{self.bn}"

    @property
    def name(self) -> str:
        """The fp16 tactic's name (the int8 tactics add their output type)."""
        return f"gemm_mma_pipelined_f16_{self.bm}x{self.bn}x{self.bk}_s{self.stages}"

    @property
    def defines(self) -> tuple[tuple[str, int], ...]:
        values = (self.bm, self.bn, self.bk, self.stages, self.warps_m, self.warps_n)
        keys = ("BM", "BN", "BK", "STAGES", "WARPS_M", "WARPS_N")
        return tuple((f"{self.macro}_{key}", value) for key, value in zip(keys, values))

    def grid(self, m: int, n: int) -> tuple[int, int]:
        return ceil_div(n, self.bn), ceil_div(m, self.bm)


#: The variants offered to the selector: 8 warps of 64 x 32 (3 stages: 48 KB, 4 stages: 64 KB),
#: 4 warps of 64 x 32 on 128 x 64, and the small-problem 64 x 64 tile (4 warps of 32 x 32).
TILES: tuple[PipelinedTile, ...] = (
    PipelinedTile(128, 128, 32, 3, 2, 4),
    PipelinedTile(128, 128, 32, 4, 2, 4),
    PipelinedTile(128, 64, 32, 3, 2, 2),
    PipelinedTile(64, 64, 32, 3, 2, 2),
)


def pipelined_check(tile: PipelinedTile) -> Check:
    """check_own_gemm plus the kernel's 16-byte rows, and no tile over twice the output."""

    def check(layer: Layer, plan: Plan) -> str | None:
        reason = check_own_gemm(layer, plan)
        if reason is not None:
            return reason
        dims = gemm_dims(layer, plan)
        if isinstance(dims, str):
            return dims
        _, m, n, k = dims
        odd = [f"{name} = {value}" for name, value in (("K", k), ("N", n)) if value % 8]
        if odd:
            return f"{' and '.join(odd)}: K and N must be multiples of 8 (16-byte cp.async rows)"
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


def lower_pipelined_gemm(ctx: LowerContext, tile: PipelinedTile) -> None:
    """C = epilogue(A @ B + bias) with gemm_mma_pipelined.cu at ``tile``."""
    a, b, m, n, k = gemm_operands(ctx)
    dtype = ctx.input_dtype(0)
    if dtype != np.float16:
        raise LoweringError(f"{tile.name} runs fp16 operands, got {dtype}")
    bias = bias_operand(ctx, 2, n, dtype) if ctx.layer.op_type in ("Gemm", "GemmAct") else None
    residual = ctx.input(3) if ctx.layer.op_type == "GemmAct" else None
    res = None if residual is None else residual.with_shape((m, n))
    out = ctx.output(0).with_shape((m, n))
    code, alpha, beta, first = epilogue_arguments(ctx)
    args = (a, b, bias, res, out, m, n, k, k, n, n, code, alpha, beta, first)
    if k % 8 or n % 8 or not _aligned(a, b, bias, res, out):
        # Same arguments and epilogue, any alignment.
        ctx.launch(FALLBACK_FILE, FALLBACK_ENTRY, (ceil_div(n, 8), ceil_div(m, 16)), (32,), args)
        return
    ctx.launch(
        KERNEL_FILE,
        ENTRY,
        tile.grid(m, n),
        (tile.threads,),
        args,
        tile.defines,
        shared_bytes=tile.shared_bytes,
    )


def _bind(tile: PipelinedTile) -> LowerFunction:
    def lower(ctx: LowerContext) -> None:
        lower_pipelined_gemm(ctx, tile)

    return lower


TACTICS: list[CudaTactic] = [
    CudaTactic(
        tile.name,
        "gemm_tensor_core",
        GEMM_OPS,
        KERNEL_FILE,
        ENTRY,
        tile.defines,
        pipelined_check(tile),
        (8, 0),
        F16S,
        F16_ONLY,
    )
    for tile in TILES
]

LOWERINGS: dict[str, LowerFunction] = {tile.name: _bind(tile) for tile in TILES}

__all__ = ["LOWERINGS", "TACTICS", "TILES", "PipelinedTile", "lower_pipelined_gemm"]
