"""Is a layer's weight 2:4 sparse along its reduction dimension, and could it use a sparse kernel?

The reduction matrix
    Sparse tensor cores (mma.sp) need, in every group of 4 consecutive values along the reduction
    dimension K of the weight operand, at least 2 zeros. We view every weight as a matrix
    ``[rows, K]`` whose rows are the dot products the layer computes:

    * Conv ``W [M, C/g, kh, kw]``: TensorRT's convention, 2:4 along the input channels: K = C/g,
      one row per (m, kh, kw), i.e. ``W`` transposed to ``[M, kh, kw, C/g]`` and reshaped to
      ``[M*kh*kw, C/g]`` (row index ``(m*kh + i)*kw + j``). The im2col reduction then visits the
      input channels innermost for every kernel offset.
    * Gemm ``B [K, N]`` (transB=0) or ``[N, K]`` (transB=1) and MatMul ``B [..., K, N]``: one row
      per output column n (per batch of B) holding its K values.
    * gie::ConvAct as Conv; gie::GemmAct as Gemm or MatMul according to its ``kind``.

Eligibility (``eligible`` = the sparse path would be used), checked in this order:
    the weight must be a constant (an initializer that no graph input overrides), the layer must
    not be a depthwise convolution, K must be a multiple of 4, and K must be at least
    ``min_channels`` (NVIDIA's guidance: sparse kernels pay off from about 256 input channels).
Only the weight (input 1) is considered: a MatMul with a constant left operand is not a layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.registry import GIE_DOMAIN, Attrs, normalize_domain

#: (domain, op_type) of the layers that carry a weight operand a sparse kernel could use.
WEIGHT_LAYERS: frozenset[tuple[str, str]] = frozenset(
    {
        ("", "Conv"),
        ("", "Gemm"),
        ("", "MatMul"),
        (GIE_DOMAIN, "ConvAct"),
        (GIE_DOMAIN, "GemmAct"),
    }
)

#: NVIDIA's guidance: layers with fewer input channels rarely run faster sparse.
DEFAULT_MIN_CHANNELS = 256

#: 2:4 sparsity: at most 2 non-zero values in every group of this many along K.
GROUP = 4


def _attrs(attrs: Attrs | Mapping[str, Any] | None) -> Attrs:
    if isinstance(attrs, Attrs):
        return attrs
    return Attrs(dict(attrs or {}))


def _family(op: str, attrs: Attrs) -> str:
    """'Conv', 'Gemm' or 'MatMul': how the weight of ``op`` is laid out."""
    if op in ("Conv", "ConvAct"):
        return "Conv"
    if op == "GemmAct":
        return attrs.str("kind", "Gemm") or "Gemm"
    if op in ("Gemm", "MatMul"):
        return op
    raise ValueError(f"{op} has no weight operand 2:4 sparsity applies to")


def reduction_matrix(
    weight: np.ndarray, op: str, attrs: Attrs | Mapping[str, Any] | None = None
) -> np.ndarray:
    """The weight of ``op`` as a ``[rows, K]`` matrix along its reduction dimension (a copy).

    ``op`` is the node's op_type (Conv, Gemm, MatMul, ConvAct, GemmAct); ``attrs`` its
    attributes (``transB`` for Gemm, ``kind`` for GemmAct). See the module docstring.
    """
    weight = np.asarray(weight)
    family = _family(op, _attrs(attrs))
    if family == "Conv":
        if weight.ndim < 3:
            raise ValueError(f"Conv weight must be [M, C/g, *kernel], got shape {weight.shape}")
        return np.ascontiguousarray(np.moveaxis(weight, 1, -1).reshape(-1, weight.shape[1]))
    if family == "Gemm":
        if weight.ndim != 2:
            raise ValueError(f"Gemm weight must be 2-D, got shape {weight.shape}")
        trans_b = _attrs(attrs).int("transB", 0)
        return np.ascontiguousarray(weight if trans_b else weight.T)
    if weight.ndim < 2:
        raise ValueError(f"MatMul weight must be at least 2-D, got shape {weight.shape}")
    return np.ascontiguousarray(np.swapaxes(weight, -1, -2).reshape(-1, weight.shape[-2]))


def weight_from_matrix(
    matrix: np.ndarray,
    shape: tuple[int, ...],
    op: str,
    attrs: Attrs | Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Inverse of :func:`reduction_matrix`: the ``[rows, K]`` matrix as a weight of ``shape``."""
    matrix = np.asarray(matrix)
    family = _family(op, _attrs(attrs))
    if family == "Conv":
        moved = (shape[0], *shape[2:], shape[1])
        return np.ascontiguousarray(np.moveaxis(matrix.reshape(moved), -1, 1))
    if family == "Gemm":
        trans_b = _attrs(attrs).int("transB", 0)
        return np.ascontiguousarray(matrix if trans_b else matrix.T).reshape(shape)
    swapped = (*shape[:-2], shape[-1], shape[-2])
    return np.ascontiguousarray(np.swapaxes(matrix.reshape(swapped), -1, -2))


def _groups(matrix: np.ndarray) -> np.ndarray:
    """Non-zero flags of the complete groups of 4 along K: ``[rows, K // 4, 4]``."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"expected a [rows, K] matrix, got shape {matrix.shape}")
    whole = matrix.shape[1] // GROUP * GROUP
    return (matrix[:, :whole] != 0).reshape(matrix.shape[0], -1, GROUP)


def compliant_fraction(matrix: np.ndarray) -> float:
    """Fraction of the groups of 4 consecutive values along K that hold at least 2 zeros.

    Only complete groups count (a trailing partial group is ignored); 0.0 when there is none.
    """
    groups = _groups(matrix)
    if groups.shape[1] == 0 or groups.shape[0] == 0:
        return 0.0
    return float(np.mean(groups.sum(axis=-1) <= GROUP // 2))


def is_2_4(matrix: np.ndarray) -> bool:
    """True when K is a multiple of 4 and every group of 4 along K holds at least 2 zeros."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[1] % GROUP:
        return False
    return bool(np.all(_groups(matrix).sum(axis=-1) <= GROUP // 2))


@dataclass(frozen=True)
class LayerSparsity:
    """The 2:4 status of one layer.

    ``eligible``: a sparse kernel would be used for it; otherwise ``reason`` says why not ("" when
    eligible). ``is_2_4`` and ``compliant_fraction`` describe the weight as it is now (False and
    0.0 when the weight is not a constant). ``k`` is the reduction length, ``rows`` the number
    of rows of the reduction matrix (0 when unknown).
    """

    name: str
    op: str
    eligible: bool
    reason: str
    is_2_4: bool
    compliant_fraction: float
    k: int
    rows: int


def is_weight_layer(node: ir.Node) -> bool:
    """True for the node types :func:`check_model` looks at."""
    return (normalize_domain(node.domain), node.op_type) in {
        (normalize_domain(d), op) for d, op in WEIGHT_LAYERS
    }


def constant_weight(node: ir.Node) -> np.ndarray | None:
    """The node's weight (input 1) as an array when it is a constant, else None."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    value = node.inputs[1]
    if value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def ineligibility(
    node: ir.Node, weight: np.ndarray | None, min_channels: int = DEFAULT_MIN_CHANNELS
) -> str:
    """Why the sparse path would not be used for ``node`` ("" when it would)."""
    if weight is None:
        return "weight is not a constant"
    attrs = Attrs.from_node(node)
    try:
        matrix_k = reduction_matrix(weight, node.op_type, attrs).shape[1]
    except ValueError as error:
        return f"weight has no [rows, K] view: {error}"
    if _family(node.op_type, attrs) == "Conv" and matrix_k == 1 and attrs.int("group", 1) > 1:
        return "depthwise convolution (one input channel per group)"
    if matrix_k % GROUP:
        return f"K = {matrix_k} is not a multiple of {GROUP}"
    if matrix_k < min_channels:
        return (
            f"too small to benefit: {matrix_k} < {min_channels} input channels (NVIDIA's guidance)"
        )
    return ""


def check_layer(node: ir.Node, min_channels: int = DEFAULT_MIN_CHANNELS) -> LayerSparsity:
    """The :class:`LayerSparsity` of one Conv/Gemm/MatMul/ConvAct/GemmAct node."""
    weight = constant_weight(node)
    reason = ineligibility(node, weight, min_channels)
    if weight is None or reason.startswith("weight has no"):
        return LayerSparsity(node.name or "", node.op_type, False, reason, False, 0.0, 0, 0)
    matrix = reduction_matrix(weight, node.op_type, Attrs.from_node(node))
    return LayerSparsity(
        name=node.name or "",
        op=node.op_type,
        eligible=not reason,
        reason=reason,
        is_2_4=is_2_4(matrix),
        compliant_fraction=compliant_fraction(matrix),
        k=int(matrix.shape[1]),
        rows=int(matrix.shape[0]),
    )


def check_model(model: ir.Model, min_channels: int = DEFAULT_MIN_CHANNELS) -> list[LayerSparsity]:
    """One :class:`LayerSparsity` per weight layer of the main graph, in graph order."""
    return [check_layer(node, min_channels) for node in model.graph if is_weight_layer(node)]


__all__ = [
    "DEFAULT_MIN_CHANNELS",
    "GROUP",
    "WEIGHT_LAYERS",
    "LayerSparsity",
    "check_layer",
    "check_model",
    "compliant_fraction",
    "constant_weight",
    "ineligibility",
    "is_2_4",
    "is_weight_layer",
    "reduction_matrix",
    "weight_from_matrix",
]
