"""The 2:4 structured-sparse tactic: convolutions and GEMMs computed from the compressed weight.

``sparse_2_4`` applies to Conv, gie::ConvAct, Gemm, MatMul (constant 2-D weight) and
gie::GemmAct layers, and to their int8 forms gie::QConv / gie::QGemm (exact int32
accumulation from the compressed int8 weight, the ``sm80_s8`` metadata layout), whose
constant weight already is 2:4 along its reduction dimension
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
from engine.ops.gie_quant import _channel_scales, _finish, _require_int8, _scalar_scale
from engine.ops.registry import Attrs, Kernel, KernelContext
from engine.quantize.qparams import add_bias, combined_scale
from engine.sparsity.check import is_2_4, reduction_matrix
from engine.sparsity.compress import Compressed, compress_2_4
from engine.sparsity.sparse_kernels import sparse_conv, sparse_matmul

SPARSE_CONV_OPS = frozenset({"Conv", "gie::ConvAct"})
SPARSE_GEMM_OPS = frozenset({"Gemm", "MatMul", "gie::GemmAct"})
SPARSE_INT8_OPS = frozenset({"gie::QConv", "gie::QGemm"})
#: The op whose weight layout a layer's weight has (int8 layers keep their float op's layout).
_LAYOUT_OF = {"QConv": "Conv", "QGemm": "GemmAct"}


def _optional(inputs: list[Any], index: int) -> Any:
    return inputs[index] if len(inputs) > index else None


def _weight_index(layer: Layer) -> int:
    return 2 if layer.op_type in _LAYOUT_OF and layer.domain == "gie" else 1


def _matrix(layer: Layer, weight: np.ndarray) -> np.ndarray:
    op = _LAYOUT_OF.get(layer.op_type, layer.op_type) if layer.domain == "gie" else layer.op_type
    return reduction_matrix(weight, op, layer.attrs)


def _compressor(layer: Layer, dtype: type = np.float32) -> Prepared:
    def compress(weight: np.ndarray) -> Compressed:
        return compress_2_4(_matrix(layer, weight).astype(dtype), dtype=dtype)

    return Prepared(compress)


def _conv_attrs(attrs: Attrs, weight: np.ndarray) -> Attrs:
    """``attrs`` with ``kernel_shape`` (ONNX lets a Conv omit it: the weight's shape says)."""
    if "kernel_shape" in attrs:
        return attrs
    values = {name: attrs.get(name) for name in attrs.names()}
    return Attrs({**values, "kernel_shape": list(weight.shape[2:])})


def check_sparse(layer: Layer, plan: Plan) -> str | None:
    """Why ``sparse_2_4`` cannot run ``layer`` (None when it can)."""
    index = _weight_index(layer)
    weight_name = layer.inputs[index] if len(layer.inputs) > index else ""
    weight = plan.constants.get(weight_name)
    if weight is None:
        return "sparse_2_4 needs a constant weight"
    if layer.qualified_op == "MatMul" and weight.ndim != 2:
        return "sparse_2_4 needs a 2-D MatMul weight"
    conv = layer.qualified_op in SPARSE_CONV_OPS or layer.op_type == "QConv"
    if conv and weight.shape[1] == 1 and layer.attrs.int("group", 1) > 1:
        return "sparse_2_4 does not run depthwise convolutions"
    matrix = _matrix(layer, weight)
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
        conv_attrs = _conv_attrs(attrs, w)
        y = sparse_conv(compressed(w), conv_attrs, x, bias).astype(x.dtype, copy=False)
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


def sparse_qconv_kernel(layer: Layer) -> Kernel:
    """gie::QConv from the compressed int8 weight: exact int32 accumulation, then the op's own
    bias, requantization and epilogue (engine.ops.gie_quant)."""
    compressed = _compressor(layer, np.int8)

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
        x_q = _require_int8("QConv input X_q", inputs[0])
        w_q = _require_int8("QConv weight W_q", inputs[2])
        scale = combined_scale(
            _scalar_scale("X_scale", inputs[1]),
            _channel_scales("W_scale", inputs[3], w_q.shape[0]),
        )
        acc = sparse_conv(compressed(w_q), _conv_attrs(attrs, w_q), x_q).astype(np.int32)
        acc = add_bias(acc, _optional(inputs, 4), channel_axis=1)
        return [_finish(acc, scale, 1, _optional(inputs, 5), _optional(inputs, 6), attrs)]

    return kernel


def sparse_qgemm_kernel(layer: Layer) -> Kernel:
    """gie::QGemm from the compressed int8 weight (exact, then as the op finishes)."""
    compressed = _compressor(layer, np.int8)

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
        a_q = _require_int8("QGemm input A_q", inputs[0])
        b_q = _require_int8("QGemm weight B_q", inputs[2])
        matmul = (attrs.str("kind", "Gemm") or "Gemm") == "MatMul"
        if not matmul and attrs.int("transA", 0):
            a_q = a_q.T
        channels = b_q.shape[0] if not matmul and attrs.int("transB", 0) else b_q.shape[1]
        scale = combined_scale(
            _scalar_scale("A_scale", inputs[1]), _channel_scales("B_scale", inputs[3], channels)
        )
        rows = a_q.reshape(-1, a_q.shape[-1])
        acc = sparse_matmul(compressed(b_q), rows.T).T.reshape(*a_q.shape[:-1], -1)
        acc = add_bias(acc.astype(np.int32), _optional(inputs, 4), channel_axis=-1)
        return [_finish(acc, scale, -1, _optional(inputs, 5), _optional(inputs, 6), attrs)]

    return kernel


__all__ = [
    "SPARSE_CONV_OPS",
    "SPARSE_GEMM_OPS",
    "SPARSE_INT8_OPS",
    "check_sparse",
    "sparse_conv_kernel",
    "sparse_gemm_kernel",
    "sparse_qconv_kernel",
    "sparse_qgemm_kernel",
]
