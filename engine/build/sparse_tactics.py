"""The 2:4 structured-sparse tactic: convolutions and GEMMs computed from the compressed weight.

``sparse_2_4`` applies to Conv, gie::ConvAct, Gemm, MatMul (constant 2-D weight) and
gie::GemmAct layers whose constant weight already is 2:4 along its reduction dimension
(engine.sparsity.check; ``BuilderConfig.sparsity`` ``force`` prunes eligible weights first).
The weight is compressed once per weight array (values + 2-bit metadata, the layout the
mma.sp tensor-core instructions read: engine.sparsity.compress) and every run multiplies from
the compressed form (engine.sparsity.sparse_kernels), then applies the op's own bias,
alpha/beta and epilogue. Like TensorRT, the builder offers it as one more candidate and keeps
it only when it times faster than the dense tactics (on the NumPy backend it rarely is: the
sparse tensor-core speed-up is a GPU property; the build log says by how much it lost).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.build.plan import Layer, Plan
from engine.build.tactic_kernels import Prepared
from engine.ops.gie_fused import _is_matmul, apply_epilogue
from engine.ops.registry import Attrs, Kernel, KernelContext
from engine.sparsity.check import is_2_4, reduction_matrix
from engine.sparsity.compress import Compressed, compress_2_4
from engine.sparsity.sparse_kernels import sparse_conv, sparse_matmul

SPARSE_CONV_OPS = frozenset({"Conv", "gie::ConvAct"})
SPARSE_GEMM_OPS = frozenset({"Gemm", "MatMul", "gie::GemmAct"})


def _optional(inputs: list[Any], index: int) -> Any:
    return inputs[index] if len(inputs) > index else None


def _compressor(layer: Layer) -> Prepared:
    def compress(weight: np.ndarray) -> Compressed:
        matrix = reduction_matrix(weight, layer.op_type, layer.attrs)
        return compress_2_4(matrix.astype(np.float32), dtype=np.float32)

    return Prepared(compress)


def check_sparse(layer: Layer, plan: Plan) -> str | None:
    """Why ``sparse_2_4`` cannot run ``layer`` (None when it can)."""
    weight_name = layer.inputs[1] if len(layer.inputs) > 1 else ""
    weight = plan.constants.get(weight_name)
    if weight is None:
        return "sparse_2_4 needs a constant weight"
    if layer.qualified_op == "MatMul" and weight.ndim != 2:
        return "sparse_2_4 needs a 2-D MatMul weight"
    if (
        layer.qualified_op in SPARSE_CONV_OPS
        and weight.shape[1] == 1
        and layer.attrs.int("group", 1) > 1
    ):
        return "sparse_2_4 does not run depthwise convolutions"
    matrix = reduction_matrix(weight, layer.op_type, layer.attrs)
    if matrix.shape[1] % 4:
        return f"sparse_2_4 needs K a multiple of 4 (K = {matrix.shape[1]})"
    if not is_2_4(matrix):
        return "the weight is not 2:4 sparse (prune it, or build with sparsity 'force')"
    return None


def sparse_conv_kernel(layer: Layer) -> Kernel:
    """Conv / ConvAct from the compressed weight."""
    compressed = _compressor(layer)
    fused = layer.qualified_op == "gie::ConvAct"

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
        x, w, bias = inputs[0], inputs[1], _optional(inputs, 2)
        y = sparse_conv(compressed(w), attrs, x, bias).astype(x.dtype, copy=False)
        if fused:
            y = apply_epilogue(y, _optional(inputs, 3), attrs)
        return [y]

    return kernel


def sparse_gemm_kernel(layer: Layer) -> Kernel:
    """Gemm / MatMul / GemmAct from the compressed weight (B is the weight)."""
    compressed = _compressor(layer)
    op = layer.qualified_op

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
        a, b, c = inputs[0], inputs[1], _optional(inputs, 2)
        packed = compressed(b)
        if op == "MatMul" or (op == "gie::GemmAct" and _is_matmul(attrs)):
            rows = a.reshape(-1, a.shape[-1])
            y = sparse_matmul(packed, rows.T).T.reshape(*a.shape[:-1], -1)
            if c is not None:
                y = y + c
        else:
            left = a.T if attrs.int("transA", 0) else a
            y = sparse_matmul(packed, left.T).T * attrs.float("alpha", 1.0)
            if c is not None:
                y = y + attrs.float("beta", 1.0) * c
        y = np.asarray(y).astype(a.dtype, copy=False)
        if op == "gie::GemmAct":
            y = apply_epilogue(y, _optional(inputs, 3), attrs)
        return [y]

    return kernel


__all__ = [
    "SPARSE_CONV_OPS",
    "SPARSE_GEMM_OPS",
    "check_sparse",
    "sparse_conv_kernel",
    "sparse_gemm_kernel",
]
