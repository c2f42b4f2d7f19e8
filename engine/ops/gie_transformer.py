"""Fused transformer ops of the engine's ``gie`` domain: LayerNorm, RMSNorm, Gelu, Attention.

The O3 transformer pass (:mod:`engine.passes.transformer`) replaces the decomposed forms that
exporters emit with these ops. Every kernel computes in float32 (float64 inputs stay float64)
and returns the input dtype.

gie::LayerNorm(X, Scale, [Bias], [Residual]) -> Y, [S]
    ``S = X + Residual`` (broadcast; ``S = X`` without Residual); ``Y`` normalizes ``S`` over
    the axes ``axis..rank-1`` (mean and biased variance), then ``* Scale + Bias``. Attributes
    ``axis`` (int, default -1) and ``epsilon`` (float, default 1e-5). The optional second output
    is ``S`` itself (the residual stream of pre-LN models).
gie::RMSNorm(X, Scale) -> Y
    ``Y = X / sqrt(mean(X^2 over axis..rank-1) + epsilon) * Scale``; ``axis`` (default -1),
    ``epsilon`` (default 1e-6).
gie::Gelu(X) -> Y
    ``approximate = "none"``: ``0.5 x (1 + erf(x / sqrt 2))``; ``"tanh"``:
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.
gie::Attention(Q, K, V, [Mask]) -> Y
    Q ``[batch, seq_q, hidden]``, K ``[batch, seq_k, hidden]``, V ``[batch, seq_k, hidden_v]``
    (already projected); ``num_heads`` splits the last axis into heads; per head
    ``softmax(scale * Q K^T + Mask) V`` with ``scale`` (default ``1/sqrt(head_dim)``), an
    additive float Mask broadcastable to ``[batch, heads, seq_q, seq_k]``, and ``causal = 1``
    hiding keys after the query's position (aligned at the end when seq_k > seq_q). Heads are
    merged back: Y is ``[batch, seq_q, hidden_v]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import erf

from engine.ops.common import broadcast_dims, normalize_axis
from engine.ops.registry import (
    GIE_DOMAIN,
    Attrs,
    KernelContext,
    KernelError,
    OpCost,
    OpSpec,
    TensorSpec,
)

FAMILY = "gie_transformer"


def _compute_dtype(x: np.ndarray) -> type:
    """float64 stays float64; every other float type computes in float32."""
    return np.float64 if x.dtype == np.float64 else np.float32


def _norm_axes(x: np.ndarray, attrs: Attrs) -> tuple[int, ...]:
    axis = normalize_axis(attrs.int("axis", -1), x.ndim)
    return tuple(range(axis, x.ndim))


def _bytes(specs: list[TensorSpec | None]) -> int:
    return sum(s.nbytes() for s in specs if s is not None)


def _numel(spec: TensorSpec | None) -> int:
    return spec.numel() if spec is not None and spec.is_static else 0


# --------------------------------------------------------------------------- LayerNorm


def _layer_norm_kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    residual = inputs[3] if len(inputs) > 3 else None
    dtype = _compute_dtype(x)
    s = x.astype(dtype)
    if residual is not None:
        s = s + residual.astype(dtype)
    axes = _norm_axes(s, attrs)
    mean = s.mean(axis=axes, keepdims=True, dtype=dtype)
    centered = s - mean
    variance = np.mean(centered * centered, axis=axes, keepdims=True, dtype=dtype)
    y = centered / np.sqrt(variance + dtype(attrs.float("epsilon", 1e-5))) * scale.astype(dtype)
    if bias is not None:
        y = y + bias.astype(dtype)
    outputs = [y.astype(x.dtype, copy=False)]
    if ctx.output_count > 1:
        outputs.append(s.astype(x.dtype, copy=False))
    return outputs


def _layer_norm_shape(
    specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext
) -> list[TensorSpec]:
    x = specs[0]
    residual = specs[3] if len(specs) > 3 else None
    shape = x.shape
    if residual is not None and shape is not None and residual.shape is not None:
        shape = broadcast_dims([shape, residual.shape])
    elif residual is not None:
        shape = None
    return [TensorSpec(shape, x.dtype) for _ in range(max(ctx.output_count, 1))]


def _layer_norm_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    # residual add, mean, centre, square+sum, scale, shift: about 8 operations per element
    return OpCost(8 * _numel(outs[0]), _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- RMSNorm


def _rms_norm_kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x, scale = inputs[0], inputs[1]
    dtype = _compute_dtype(x)
    s = x.astype(dtype)
    axes = _norm_axes(s, attrs)
    mean_square = np.mean(s * s, axis=axes, keepdims=True, dtype=dtype)
    y = s / np.sqrt(mean_square + dtype(attrs.float("epsilon", 1e-6))) * scale.astype(dtype)
    return [y.astype(x.dtype, copy=False)]


def _same_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    return [TensorSpec(specs[0].shape, specs[0].dtype)]


def _per_element_cost(flops: int):
    def cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
        return OpCost(flops * _numel(outs[0]), _bytes(ins), _bytes(outs))

    return cost


# --------------------------------------------------------------------------- Gelu

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    dtype = _compute_dtype(x)
    s = x.astype(dtype)
    approximate = attrs.str("approximate", "none")
    if approximate == "tanh":
        inner = dtype(_SQRT_2_OVER_PI) * (s + dtype(0.044715) * s * s * s)
        y = dtype(0.5) * s * (dtype(1.0) + np.tanh(inner))
    elif approximate == "none":
        y = dtype(0.5) * s * (dtype(1.0) + erf(s / dtype(math.sqrt(2.0))).astype(dtype))
    else:
        raise KernelError(f"gie::Gelu: approximate must be 'none' or 'tanh', not {approximate!r}")
    return [y.astype(x.dtype, copy=False)]


# --------------------------------------------------------------------------- Attention


def _attention_kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    q, k, v = inputs[0], inputs[1], inputs[2]
    mask = inputs[3] if len(inputs) > 3 else None
    heads = attrs.int("num_heads")
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise KernelError("gie::Attention: Q, K and V must be [batch, seq, hidden]")
    if q.shape[-1] % heads or v.shape[-1] % heads or q.shape[-1] != k.shape[-1]:
        raise KernelError(
            f"gie::Attention: hidden sizes {q.shape[-1]}/{k.shape[-1]}/{v.shape[-1]} "
            f"do not split into {heads} heads"
        )
    dtype = _compute_dtype(q)
    batch, seq_q, hidden = q.shape
    seq_k = k.shape[1]
    head_dim, head_dim_v = hidden // heads, v.shape[-1] // heads
    scale = attrs.float("scale", 1.0 / math.sqrt(head_dim))
    q4 = q.astype(dtype).reshape(batch, seq_q, heads, head_dim).transpose(0, 2, 1, 3)
    k4 = k.astype(dtype).reshape(k.shape[0], seq_k, heads, head_dim).transpose(0, 2, 3, 1)
    v4 = v.astype(dtype).reshape(v.shape[0], seq_k, heads, head_dim_v).transpose(0, 2, 1, 3)
    scores = np.matmul(q4, k4) * dtype(scale)
    if mask is not None:
        scores = scores + mask.astype(dtype)
    if attrs.int("causal", 0):
        allowed = np.tril(np.ones((seq_q, seq_k), dtype=bool), k=seq_k - seq_q)
        scores = np.where(allowed, scores, dtype(-np.inf))
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    out = np.matmul(weights, v4).transpose(0, 2, 1, 3).reshape(batch, seq_q, heads * head_dim_v)
    return [out.astype(q.dtype, copy=False)]


def _attention_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    q, v = specs[0], specs[2]
    if q.shape is None or v.shape is None or len(q.shape) != 3 or len(v.shape) != 3:
        return [TensorSpec(None, q.dtype)]
    return [TensorSpec((q.shape[0], q.shape[1], v.shape[2]), q.dtype)]


def _attention_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """QK^T and PV (2 flops per multiply-add each) plus ~5 flops per score for the softmax;
    the scores never touch main memory."""
    q, k, v = ins[0], ins[1], ins[2]
    if not (q.is_static and k.is_static and v.is_static) or q.rank != 3:
        return OpCost(0, _bytes(ins), _bytes(outs))
    batch, seq_q, hidden = q.shape  # type: ignore[misc]
    seq_k, hidden_v = k.shape[1], v.shape[2]  # type: ignore[index]
    heads = int(attrs.int("num_heads"))
    scores = batch * heads * seq_q * seq_k
    flops = 2 * batch * seq_q * seq_k * (hidden + hidden_v) + 5 * scores  # type: ignore[operator]
    return OpCost(int(flops), _bytes(ins), _bytes(outs))


def _spec(op_type: str, kernel: Any, shape_rule: Any, cost: Any) -> OpSpec:
    return OpSpec(op_type, kernel, shape_rule, cost, domain=GIE_DOMAIN, family=FAMILY)


OPS: list[OpSpec] = [
    _spec("LayerNorm", _layer_norm_kernel, _layer_norm_shape, _layer_norm_cost),
    _spec("RMSNorm", _rms_norm_kernel, _same_shape, _per_element_cost(4)),
    _spec("Gelu", _gelu_kernel, _same_shape, _per_element_cost(8)),
    _spec("Attention", _attention_kernel, _attention_shape, _attention_cost),
]
