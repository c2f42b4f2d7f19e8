"""Linear algebra: Gemm, MatMul, Einsum and Det.

Low-precision floats (float16, bfloat16, float8) are multiplied in float32 and cast back; float32,
float64 and integer tensors are multiplied in their own dtype.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.common import (
    Dim,
    _bytes,
    _numel,
    broadcast_dims,
    declared_rule,
    elementwise_cost,
    same_as_input,
)
from engine.ops.registry import Attrs, KernelContext, KernelError, OpCost, OpSpec, TensorSpec


def accum_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype products are accumulated in: float32 for sub-32-bit floats, else unchanged."""
    if dtype in (np.float32, np.float64) or dtype.kind in "iub":
        return dtype
    return np.dtype(np.float32)


def _work(array: np.ndarray) -> np.ndarray:
    """The operand in its accumulation dtype."""
    return array.astype(accum_dtype(array.dtype), copy=False)


# --------------------------------------------------------------------------- Gemm


def _gemm(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """Gemm: alpha * op(A) @ op(B) + beta * C."""
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    alpha, beta = attrs.float("alpha", 1.0), attrs.float("beta", 1.0)
    wa, wb = _work(a), _work(b)
    if attrs.int("transA", 0):
        wa = wa.T
    if attrs.int("transB", 0):
        wb = wb.T
    if wa.ndim != 2 or wb.ndim != 2 or wa.shape[1] != wb.shape[0]:
        raise KernelError(f"Gemm operands {a.shape} and {b.shape} do not multiply")
    y = wa @ wb
    if alpha != 1.0:
        y = y * np.asarray(alpha, dtype=y.dtype)
    if c is not None and beta != 0.0:
        wc = _work(c)
        y = y + (wc if beta == 1.0 else wc * np.asarray(beta, dtype=wc.dtype))
    return [y.astype(a.dtype, copy=False)]


def _gemm_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """(M, N) after the optional transposes."""
    a, b = specs[0], specs[1]
    if a.shape is None or b.shape is None:
        return [TensorSpec(None, a.dtype)]
    m = a.shape[1] if attrs.int("transA", 0) else a.shape[0]
    n = b.shape[0] if attrs.int("transB", 0) else b.shape[1]
    return [TensorSpec((m, n), a.dtype)]


def _gemm_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """2*K FLOPs per output element, plus the alpha/beta epilogue."""
    a = ins[0]
    k = a.shape[0] if attrs.int("transA", 0) else a.shape[1]
    k = k if isinstance(k, int) else 0
    return OpCost(2 * k * _numel(outs[0]) + 2 * _numel(outs[0]), _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- MatMul


def _matmul(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """MatMul with NumPy semantics (broadcast batches, 1-D promotion)."""
    a, b = inputs[0], inputs[1]
    return [np.asarray(np.matmul(_work(a), _work(b))).astype(a.dtype, copy=False)]


def _matmul_dims(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """Output shape of numpy-style matmul on (possibly symbolic) shapes."""
    a_vec, b_vec = len(a) == 1, len(b) == 1
    a2 = (1, *a) if a_vec else a
    b2 = (*b, 1) if b_vec else b
    batch = broadcast_dims([a2[:-2], b2[:-2]])
    out = (*batch, a2[-2], b2[-1])
    if a_vec:
        out = out[:-2] + out[-1:]
    if b_vec:
        out = out[:-1]
    return out


def _matmul_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """Broadcast batch dims and (M, N), dropping promoted 1-D dims."""
    a, b = specs[0], specs[1]
    if a.shape is None or b.shape is None:
        return [TensorSpec(None, a.dtype)]
    return [TensorSpec(_matmul_dims(a.shape, b.shape), a.dtype)]


def _matmul_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """2*K FLOPs per output element."""
    k = ins[0].shape[-1] if ins[0].shape else 0
    k = k if isinstance(k, int) else 0
    return OpCost(2 * k * _numel(outs[0]), _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- Einsum


def _equation(attrs: Attrs) -> str:
    """The Einsum equation without spaces."""
    return (attrs.str("equation") or "").replace(" ", "")


def _einsum(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """Einsum via numpy.einsum (BLAS-backed contraction paths)."""
    equation = _equation(attrs)
    operands = [_work(x) for x in inputs]
    try:
        result = np.einsum(equation, *operands, optimize=True)
    except ValueError as error:
        raise KernelError(f"Einsum '{equation}': {error}") from error
    return [np.asarray(result).astype(inputs[0].dtype, copy=False)]


def _einsum_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """Output dims from the equation's labels (implicit mode: sorted single labels)."""
    dtype = specs[0].dtype
    if any(s.shape is None for s in specs):
        return [TensorSpec(None, dtype)]
    equation = _equation(attrs)
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    sizes: dict[str, Dim] = {}
    ellipsis: list[tuple[Dim, ...]] = []
    for term, spec in zip(terms, specs, strict=False):
        shape = spec.shape
        head, dots, tail = term.partition("...")
        n_ell = len(shape) - len(head) - len(tail) if dots else 0
        ellipsis.append(tuple(shape[len(head) : len(head) + n_ell]))
        dims = list(shape[: len(head)]) + list(shape[len(shape) - len(tail) :] if tail else [])
        for label, dim in zip(list(head) + list(tail), dims, strict=False):
            known = sizes.get(label)
            if known is None or known == 1 or not isinstance(known, int):
                sizes[label] = dim if dim is not None or known is None else known
    if not arrow:
        letters = re.sub(r"[^A-Za-z]", "", lhs)
        rhs = ("..." if "..." in lhs else "") + "".join(
            sorted(c for c in set(letters) if letters.count(c) == 1)
        )
    ell_shape = broadcast_dims(ellipsis) if ellipsis else ()
    out: list[Dim] = []
    head, dots, tail = rhs.partition("...")
    out.extend(sizes.get(c) for c in head)
    if dots:
        out.extend(ell_shape)
    out.extend(sizes.get(c) for c in tail)
    return [TensorSpec(tuple(out), dtype)]


def _einsum_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """Rough estimate: two FLOPs per element of the largest operand or output."""
    out = max(_numel(outs[0]), 1)
    reduced = max((_numel(s) for s in ins), default=0)
    return OpCost(2 * max(out, reduced) * max(len(ins) - 1, 1), _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- Det


def _det(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """Det of the trailing square matrices."""
    x = inputs[0]
    work = np.float64 if x.dtype == np.float64 else np.float32
    return [np.asarray(np.linalg.det(x.astype(work, copy=False))).astype(x.dtype, copy=False)]


def _det_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """The leading (batch) dims."""
    x = specs[0]
    return [TensorSpec(None if x.shape is None else tuple(x.shape[:-2]), x.dtype)]


def _det_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """About 2n^3/3 FLOPs per matrix (LU)."""
    n = ins[0].shape[-1] if ins[0].shape else 0
    n = n if isinstance(n, int) else 0
    return OpCost(max(_numel(outs[0]), 1) * (2 * n**3) // 3, _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- Attention


def _heads(x: np.ndarray, heads: int) -> np.ndarray:
    """(B, S, H*D) -> (B, H, S, D); 4-D inputs pass through."""
    if x.ndim == 4:
        return x
    b, seq, hidden = x.shape
    return x.reshape(b, seq, heads, hidden // heads).transpose(0, 2, 1, 3)


def _frontier_bias(q_len: int, kv_len: int, offset: Any, left: int, right: int, causal: bool):
    """0 / -inf bias of the causal and sliding-window constraints, (q, kv) or (B, 1, q, kv)."""
    i = np.arange(q_len)[:, None]
    j = np.arange(kv_len)[None, :]
    per_batch = np.ndim(offset) > 0
    pos = i + (np.reshape(offset, (-1, 1, 1)) if per_batch else int(offset))
    allowed = np.ones(np.broadcast_shapes(pos.shape, j.shape), dtype=bool)
    if causal:
        allowed &= j <= pos
    if left >= 0:
        allowed &= pos - j <= left
    if right >= 0:
        allowed &= j - pos <= right
    bias = np.where(allowed, 0.0, -np.inf)
    return bias[:, None] if per_batch else bias


def _attention(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """Attention (opsets 23+): scaled dot-product attention with masks, KV cache, GQA."""
    q, k, v = inputs[:3]
    mask, past_k, past_v, nonpad = (list(inputs[3:]) + [None] * 4)[:4]
    dtype = q.dtype
    # float16 follows the ONNX reference, which computes attention in the input dtype.
    work = dtype if dtype in (np.float64, np.float16) else np.dtype(np.float32)
    q_heads = attrs.int("q_num_heads", 0) or None
    kv_heads = attrs.int("kv_num_heads", 0) or None
    if q.ndim == 3 and (q_heads is None or kv_heads is None):
        raise KernelError("3-D Attention inputs need q_num_heads and kv_num_heads")
    q4 = _heads(q, q_heads or 0).astype(work)
    k4, v4 = _heads(k, kv_heads or 0), _heads(v, kv_heads or 0)
    if past_k is not None:
        k4 = np.concatenate([past_k, k4], axis=2)
        v4 = np.concatenate([past_v, v4], axis=2)
    present_k, present_v = k4, v4
    scale = attrs.get("scale")
    scale = 1 / np.sqrt(q4.shape[3]) if scale is None else float(scale)
    root = np.asarray(np.sqrt(scale), dtype=dtype).astype(work)
    q_len, kv_len = q4.shape[2], k4.shape[2]
    bias = np.zeros((q_len, kv_len), dtype=work)
    if mask is not None:
        pad = kv_len - mask.shape[-1]
        if pad > 0:
            fill = False if mask.dtype == np.bool_ else -np.inf
            mask = np.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)], constant_values=fill)
        bias = bias + (np.where(mask, 0.0, -np.inf) if mask.dtype == np.bool_ else mask)
    left = attrs.int("left_window_size", -1)
    right = attrs.int("right_window_size", -1)
    causal = bool(attrs.int("is_causal", 0))
    if causal or left >= 0 or right >= 0:
        if nonpad is not None and past_k is None:
            offset = np.asarray(nonpad).reshape(-1) - q_len
        else:
            offset = past_k.shape[2] if past_k is not None else 0
        bias = bias + _frontier_bias(q_len, kv_len, offset, left, right, causal)
    if nonpad is not None:
        keep = np.arange(kv_len) < np.asarray(nonpad).reshape(-1, 1)
        bias = bias + np.where(keep, 0.0, -np.inf).reshape(-1, 1, 1, kv_len)
    bias = bias.astype(work)
    groups = q4.shape[1] // k4.shape[1]
    if groups > 1:
        k4, v4 = np.repeat(k4, groups, axis=1), np.repeat(v4, groups, axis=1)
    # Round at the points the ONNX reference does (it computes in the input dtype).
    qs = (q4 * root).astype(dtype).astype(work)
    ks = (np.swapaxes(k4, -1, -2).astype(work) * root).astype(dtype).astype(work)
    scores = np.matmul(qs, ks).astype(dtype).astype(work)
    softcap = attrs.float("softcap", 0.0)
    if softcap > 0:
        scores = np.tanh(scores / softcap) * softcap
    with_bias = (scores + bias).astype(dtype).astype(work)
    precision = attrs.int("softmax_precision", 0)
    soft_dtype = ir.DataType(precision).numpy() if precision else work
    logits = with_bias.astype(soft_dtype)
    peak = logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits - np.where(np.isneginf(peak), 0, peak))
    total = exp.sum(axis=-1, keepdims=True)
    probs = exp / np.where(total == 0, 1, total).astype(soft_dtype)
    masked_rows = np.isneginf(bias.max(axis=-1, keepdims=True))
    probs = np.where(masked_rows, 0.0, probs).astype(work)
    mode = attrs.int("qk_matmul_output_mode", 0)
    qk_out = {2: with_bias, 3: probs}.get(mode, scores)
    y = np.matmul(probs.astype(dtype).astype(work), v4.astype(work))
    if q.ndim == 3:
        y = y.transpose(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], -1)
    outs = [y.astype(dtype), present_k, present_v, qk_out.astype(dtype)]
    return outs[: ctx.output_count]


def _attention_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """Two matmuls (4 * elements(Q) * kv_len FLOPs) plus the softmax."""
    q, k = ins[0], ins[1]
    if not (q.is_static and k.is_static):
        return OpCost(0, _bytes(ins), _bytes(outs))
    kv_len = k.shape[2] if len(k.shape) == 4 else k.shape[1]
    if len(ins) > 4 and ins[4] is not None and ins[4].is_static:
        kv_len += ins[4].shape[2]
    return OpCost(4 * _numel(q) * kv_len + 5 * _numel(outs[0]), _bytes(ins), _bytes(outs))


def _attention_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list:
    """Y, present key/value and the QK output from the 3-D or 4-D input layout."""
    q, k, v = specs[:3]
    if q.shape is None or k.shape is None or v.shape is None:
        return declared_rule(specs, attrs, ctx)
    past = specs[4] if len(specs) > 4 and specs[4] is not None else None
    if len(q.shape) == 4:
        b, heads, q_len = q.shape[:3]
        kv_heads, kv_len, v_dim = k.shape[1], k.shape[2], v.shape[3]
        y = (b, heads, q_len, v_dim)
        k_dim = k.shape[3]
    else:
        b, q_len = q.shape[:2]
        heads, kv_heads = attrs.int("q_num_heads", 1), attrs.int("kv_num_heads", 1)
        kv_len = k.shape[1]
        v_dim = v.shape[2] // kv_heads if isinstance(v.shape[2], int) else None
        k_dim = k.shape[2] // kv_heads if isinstance(k.shape[2], int) else None
        y = (b, q_len, heads * v_dim if v_dim is not None else None)
    if past is not None and past.shape is not None:
        past_len = past.shape[2]
        both = isinstance(past_len, int) and isinstance(kv_len, int)
        kv_len = past_len + kv_len if both else None
    outs = [
        TensorSpec(y, q.dtype),
        TensorSpec((b, kv_heads, kv_len, k_dim), k.dtype),
        TensorSpec((b, kv_heads, kv_len, v_dim), v.dtype),
        TensorSpec((b, heads, q_len, kv_len), q.dtype),
    ]
    return outs[: max(ctx.output_count, 1)]


def _rotary(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """RotaryEmbedding: rotate the first rotary_embedding_dim features by cos/sin caches."""
    x, cos, sin = inputs[:3]
    positions = inputs[3] if len(inputs) > 3 else None
    work = np.float64 if x.dtype == np.float64 else np.float32
    data = x.transpose(0, 2, 1, 3) if x.ndim == 4 else x
    if data.ndim == 3:
        heads = attrs.int("num_heads", 0)
        if heads <= 0:
            raise KernelError("3-D RotaryEmbedding input needs num_heads")
        data = data.reshape(*data.shape[:2], heads, -1)
    dim = attrs.int("rotary_embedding_dim", 0) or data.shape[3]
    if positions is not None:
        cos, sin = cos[positions], sin[positions]
    if cos.shape[-1] != dim // 2:
        raise KernelError(f"cos_cache last dim {cos.shape[-1]} != rotary_embedding_dim/2")
    cos = cos.astype(work)[:, :, None, :]
    sin = sin.astype(work)[:, :, None, :]
    rot = data[..., :dim].astype(work)
    interleaved = bool(attrs.int("interleaved", 0))
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else np.split(rot, 2, axis=-1)
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if interleaved:
        rot = np.stack([real, imag], axis=-1).reshape(rot.shape)
    else:
        rot = np.concatenate([real, imag], axis=-1)
    out = np.concatenate([rot.astype(x.dtype), data[..., dim:]], axis=-1)
    out = out.reshape(x.shape) if x.ndim == 3 else out.transpose(0, 2, 1, 3)
    return [np.ascontiguousarray(out)]


OPS: list[OpSpec] = [
    OpSpec("Gemm", _gemm, _gemm_shape, _gemm_cost, family="linalg"),
    OpSpec("MatMul", _matmul, _matmul_shape, _matmul_cost, family="linalg"),
    OpSpec("Einsum", _einsum, _einsum_shape, _einsum_cost, family="linalg"),
    OpSpec("Det", _det, _det_shape, _det_cost, family="linalg"),
    OpSpec("Attention", _attention, _attention_shape, _attention_cost, family="linalg"),
    OpSpec("RotaryEmbedding", _rotary, same_as_input(0), elementwise_cost(6), family="linalg"),
]
