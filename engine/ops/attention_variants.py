"""Attention variants: LinearAttention, CausalConvWithState and ai.onnx.preview::FlexAttention.

LinearAttention (opset 27) keeps a recurrent (B, H_kv, d_k, d_v) state instead of a KV cache; the
kernel evaluates the recurrence chunk-parallel (exact up to rounding), accumulating in float32.
CausalConvWithState (opset 27) is a depthwise causal 1-D convolution carrying its last k-1 inputs.
FlexAttention runs user subgraphs on the scores (``score_mod``) and probabilities (``prob_mod``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.common import _bytes, _numel, declared_rule
from engine.ops.linalg import _heads
from engine.ops.registry import Attrs, KernelContext, KernelError, OpCost, OpSpec, TensorSpec

_UPDATE_RULES = ("linear", "gated", "delta", "gated_delta")
_ACTIVATIONS = ("none", "silu", "swish")
_SOFTMAX_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _quotient(dim: Any, parts: int) -> int | None:
    """``dim / parts`` for a concrete dim, None for a symbolic or unknown one."""
    return dim // parts if isinstance(dim, int) and parts > 0 else None


# --------------------------------------------------------------------------- LinearAttention


def _heads_axis(x: np.ndarray, heads: int, name: str) -> np.ndarray:
    """(B, T, H*D) -> (B, H, 1, T, D) in float32; the size-1 axis is the GQA query group."""
    if x.ndim != 3 or x.shape[2] % heads:
        raise KernelError(f"LinearAttention {name} {x.shape} is not (B, T, {heads}*D)")
    return _heads(x.astype(np.float32), heads)[:, :, None]


def _decayed_products(x: np.ndarray, y: np.ndarray, g: np.ndarray, strict: bool) -> np.ndarray:
    """P[t, s] = sum_d x[t, d] y[s, d] exp(g[t, d] - g[s, d]) for s < t (strict) or s <= t.

    ``g`` is the cumulative log-decay, (..., C, d_k) per key dim or (..., C, 1) per head. The
    exponent is formed as a difference (never exp(g) alone), so strong decays cannot overflow.
    """
    c = x.shape[-2]
    keep = np.tri(c, c, -1 if strict else 0, dtype=bool)
    diff = g[..., :, None, :] - g[..., None, :, :]
    decay = np.exp(np.where(keep[:, :, None], diff, -np.inf))
    if g.shape[-1] == 1:
        return (x @ np.swapaxes(y, -1, -2)) * decay[..., 0]
    return np.einsum("...td,...sd,...tsd->...ts", x, y, decay, optimize=True)


def _linear_chunk(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    beta: np.ndarray | None,
    state: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One chunk of C tokens: unscaled outputs (B, H_kv, G, C, d_v) and the state after it.

    Shapes: q (B, H_kv, G, C, d_k); k (B, H_kv, 1, C, d_k); v (B, H_kv, 1, C, d_v); g the
    log-decay cumulated within the chunk, (B, H_kv, 1, C, d_k | 1); beta (B, H_kv | 1, 1, C, 1)
    or None; state (B, H_kv, 1, d_k, d_v). With S' the decayed state before token t writes,
    the written value is u_t = beta_t (v_t - S'^T k_t) (delta rules) or v_t; solving for all u of
    the chunk at once is a unit lower-triangular system.
    """
    eg = np.exp(g)
    if beta is None:
        u = v
    else:
        a = _decayed_products(k, k, g, strict=True)
        system = np.eye(k.shape[-2], dtype=np.float32) + beta * a
        u = np.linalg.solve(system, beta * (v - (k * eg) @ state))
    out = (q * eg) @ state + _decayed_products(q, k, g, strict=False) @ u
    last = g[..., -1:, :]
    state = np.exp(last).swapaxes(-1, -2) * state
    state = state + np.swapaxes(k * np.exp(last - g), -1, -2) @ u
    return out, state


def _linear_attention(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """LinearAttention: o_t = scale * q_t^T S_t over the chosen state recurrence.

    Runs chunk_size tokens at a time in closed form (the chunk-parallel algorithm the spec
    allows); the state enters and leaves each chunk exactly as the token-by-token recurrence
    would leave it. present_state takes past_state's dtype, else the query's.
    """
    query, key, value = inputs[:3]
    past, decay, beta = (list(inputs[3:]) + [None] * 3)[:3]
    rule = attrs.str("update_rule", "gated_delta")
    if rule not in _UPDATE_RULES:
        raise KernelError(f"LinearAttention update_rule '{rule}' is not one of {_UPDATE_RULES}")
    hq, hkv = attrs.int("q_num_heads"), attrs.int("kv_num_heads")
    if hq <= 0 or hkv <= 0 or hq % hkv:
        raise KernelError(f"q_num_heads {hq} must be a positive multiple of kv_num_heads {hkv}")
    gated, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    if gated != (decay is not None) or delta != (beta is not None):
        needs = [n for n, on in (("decay", gated), ("beta", delta)) if on] or ["neither"]
        raise KernelError(f"update_rule '{rule}' takes {' and '.join(needs)} of decay/beta")
    q = _heads_axis(query, hq, "query")
    b, _, _, t, dk = q.shape
    q = q.reshape(b, hkv, hq // hkv, t, dk)
    k, v = _heads_axis(key, hkv, "key"), _heads_axis(value, hkv, "value")
    dv = v.shape[-1]
    if k.shape[-1] != dk or k.shape[3] != t or v.shape[3] != t:
        raise KernelError(f"key {key.shape} / value {value.shape} do not match query {query.shape}")
    g = np.zeros((b, hkv, 1, t, 1), dtype=np.float32)
    if decay is not None:
        width = decay.shape[-1] if decay.ndim == 3 else -1
        if width not in (hkv, hkv * dk):
            raise KernelError(f"decay {decay.shape} is not (B, T, {hkv}) or (B, T, {hkv * dk})")
        g = _heads_axis(decay, hkv, "decay")
    gates = None
    if beta is not None:
        width = beta.shape[-1] if beta.ndim == 3 else -1
        if width not in (hkv, 1):
            raise KernelError(f"beta {beta.shape} is not (B, T, {hkv}) or (B, T, 1)")
        gates = _heads_axis(beta, width, "beta")
    if past is not None:
        if past.shape != (b, hkv, dk, dv):
            raise KernelError(f"past_state {past.shape} is not {(b, hkv, dk, dv)}")
        state = past.astype(np.float32)[:, :, None]
    else:
        state = np.zeros((b, hkv, 1, dk, dv), dtype=np.float32)
    scale = attrs.float("scale", 0.0) or 1.0 / np.sqrt(dk)
    chunk = max(attrs.int("chunk_size", 64), 1)
    out = np.empty((b, hkv, hq // hkv, t, dv), dtype=np.float32)
    for start in range(0, t, chunk):
        part = slice(start, min(start + chunk, t))
        g_cum = np.cumsum(g[..., part, :], axis=-2)
        beta_part = None if gates is None else gates[..., part, :]
        out[..., part, :], state = _linear_chunk(
            q[..., part, :], k[..., part, :], v[..., part, :], g_cum, beta_part, state
        )
    out = (out * np.float32(scale)).reshape(b, hq, t, dv).transpose(0, 2, 1, 3)
    present_dtype = past.dtype if past is not None else query.dtype
    return [out.reshape(b, t, hq * dv).astype(query.dtype), state[:, :, 0].astype(present_dtype)]


def _linear_attention_shape(
    specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext
) -> list[TensorSpec]:
    """output (B, T, H_q * d_v) in the query dtype; present_state (B, H_kv, d_k, d_v)."""
    query, value = specs[0], specs[2]
    past = specs[3] if len(specs) > 3 else None
    if query.shape is None or value.shape is None or len(query.shape) != 3:
        return declared_rule(specs, attrs, ctx)
    hq, hkv = attrs.int("q_num_heads"), attrs.int("kv_num_heads")
    b, t = query.shape[:2]
    dk, dv = _quotient(query.shape[2], hq), _quotient(value.shape[-1], hkv)
    state_dtype = past.dtype if past is not None else query.dtype
    return [
        TensorSpec((b, t, hq * dv if dv is not None else None), query.dtype),
        TensorSpec((b, hkv, dk, dv), state_dtype),
    ][: max(ctx.output_count, 1)]


def _linear_attention_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """The token-by-token recurrence per state element (d_k * d_v per head and token).

    Write k v^T: 2 FLOPs per kv head; decay: +1; delta read-back S^T k and correction: +3;
    query read q^T S: 2 per query head.
    """
    query, value = ins[0], ins[2]
    if not (query.is_static and value.is_static):
        return OpCost(0, _bytes(ins), _bytes(outs))
    hq, hkv = attrs.int("q_num_heads"), attrs.int("kv_num_heads")
    b, t, width = query.shape
    state = (width // hq) * (value.shape[2] // hkv)
    rule = attrs.str("update_rule", "gated_delta")
    per_kv = 2 + ("gated" in rule) + 3 * ("delta" in rule)
    flops = b * t * state * (per_kv * hkv + 2 * hq)
    return OpCost(flops, _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- CausalConvWithState


def _causal_conv(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """CausalConvWithState: y[b,c,t] = bias[c] + sum_j w[c,0,j] * padded[b,c,t+j].

    ``padded`` is past_state (zeros when omitted) followed by the input; present_state is its
    last k-1 positions. The sum runs in float32 (float64 for double) and is rounded to the input
    dtype before the optional SiLU, as the ONNX reference rounds.
    """
    x, weight = inputs[0], inputs[1]
    bias, past = (list(inputs[2:]) + [None] * 2)[:2]
    activation = attrs.str("activation", "none")
    if activation not in _ACTIVATIONS:
        raise KernelError(f"CausalConvWithState activation '{activation}' not in {_ACTIVATIONS}")
    if x.ndim != 3 or weight.ndim != 3 or weight.shape[:2] != (x.shape[1], 1):
        raise KernelError(f"weight {weight.shape} is not (channels, 1, k) for input {x.shape}")
    b, c, _ = x.shape
    k = weight.shape[2]
    if past is None:
        past = np.zeros((b, c, k - 1), dtype=x.dtype)
    elif past.shape != (b, c, k - 1):
        raise KernelError(f"past_state {past.shape} is not {(b, c, k - 1)}")
    padded = np.concatenate([past.astype(x.dtype, copy=False), x], axis=2)
    work = np.float64 if x.dtype == np.float64 else np.float32
    windows = np.lib.stride_tricks.sliding_window_view(padded.astype(work), k, axis=2)
    y = np.einsum("bctj,cj->bct", windows, weight[:, 0].astype(work))
    if bias is not None:
        y = y + bias.astype(work)[:, None]
    y = y.astype(x.dtype)
    if activation != "none":
        z = y.astype(work)
        y = (z / (1 + np.exp(-z))).astype(x.dtype)
    return [y, np.ascontiguousarray(padded[:, :, padded.shape[2] - (k - 1) :])]


def _causal_conv_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list:
    """output like the input; present_state (B, C, k - 1)."""
    x, weight = specs[0], specs[1]
    if x.shape is None:
        return declared_rule(specs, attrs, ctx)
    k = weight.shape[2] if weight.shape is not None else None
    carry = k - 1 if isinstance(k, int) else None
    outs = [TensorSpec(x.shape, x.dtype), TensorSpec((x.shape[0], x.shape[1], carry), x.dtype)]
    return outs[: max(ctx.output_count, 1)]


def _causal_conv_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """2k FLOPs per output element, +1 for the bias, +4 for a fused SiLU."""
    k = ins[1].shape[2] if ins[1].shape is not None else 0
    per = 2 * (k if isinstance(k, int) else 0)
    per += int(len(ins) > 2 and ins[2] is not None)
    per += 4 * (attrs.str("activation", "none") != "none")
    return OpCost(per * _numel(outs[0]), _bytes(ins), _bytes(outs))


# --------------------------------------------------------------------------- FlexAttention


def _modify(ctx: KernelContext, graph: ir.Graph | None, x: np.ndarray, name: str) -> np.ndarray:
    """Run a modifier subgraph on ``x``; its one output must keep x's shape (cast to x's dtype)."""
    if graph is None:
        return x
    if ctx.run_subgraph is None:
        raise KernelError(f"FlexAttention {name} needs a subgraph runner")
    results = ctx.run_subgraph(graph, [x])
    if len(results) != 1 or np.shape(results[0]) != x.shape:
        shapes = [np.shape(r) for r in results]
        raise KernelError(f"FlexAttention {name} returned {shapes}, expected one {x.shape}")
    return np.asarray(results[0]).astype(x.dtype, copy=False)


def _flex_attention(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[np.ndarray]:
    """FlexAttention: softmax(score_mod(scale * Q K^T)) -> prob_mod -> @ V, GQA by head groups.

    Q and K are each pre-scaled by sqrt(scale) and their product rounded to the input dtype, as
    the ONNX reference does; the softmax, the modifiers and the V product run in the softmax
    precision (float32 unless the inputs are double or softmax_precision says otherwise). A row
    the score modifier masks out entirely is 0/0 (NaN), as plain Softmax makes it.
    """
    q, k, v = inputs[:3]
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise KernelError(
            f"FlexAttention needs rank-4 Q, K, V, got {q.shape}, {k.shape}, {v.shape}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if k.shape[3] != q.shape[3] or v.shape[1:3] != k.shape[1:3] or hkv == 0 or hq % hkv:
        raise KernelError(f"FlexAttention Q {q.shape}, K {k.shape}, V {v.shape} do not match")
    dtype = q.dtype
    precision = attrs.get("softmax_precision")
    if precision is None:
        soft = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    elif int(precision) in _SOFTMAX_DTYPES:
        soft = ir.DataType(int(precision)).numpy()
    else:
        raise KernelError(f"FlexAttention softmax_precision {precision} is not a float type")
    work = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    scale = attrs.get("scale")
    scale = 1.0 / np.sqrt(q.shape[3]) if scale is None else float(scale)
    root = np.asarray(np.sqrt(scale), dtype=dtype).astype(work)
    groups = hq // hkv
    b, _, length, e = q.shape
    qg = (q.astype(work) * root).astype(dtype).astype(work).reshape(b, hkv, groups, length, e)
    kt = (np.swapaxes(k, -1, -2).astype(work) * root).astype(dtype).astype(work)[:, :, None]
    scores = (qg @ kt).astype(dtype).astype(soft).reshape(b, hq, length, k.shape[2])
    scores = _modify(ctx, attrs.get("score_mod"), scores, "score_mod")
    exp = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = exp / exp.sum(axis=-1, keepdims=True)
    probs = _modify(ctx, attrs.get("prob_mod"), probs, "prob_mod")
    probs = probs.reshape(b, hkv, groups, length, -1)
    y = probs @ v.astype(soft)[:, :, None]
    return [y.reshape(b, hq, length, v.shape[3]).astype(v.dtype)]


def _flex_attention_shape(
    specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext
) -> list[TensorSpec]:
    """Y (B, H_q, L, E_v) in the dtype of V."""
    q, v = specs[0], specs[2]
    if q.shape is None or v.shape is None or len(q.shape) != 4 or len(v.shape) != 4:
        return declared_rule(specs, attrs, ctx)
    return [TensorSpec((*q.shape[:3], v.shape[3]), v.dtype)]


def _flex_attention_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """Q K^T and P V (2 FLOPs per multiply-add) plus ~5 per score for scale and softmax.

    Modifier subgraphs are not counted; their own nodes carry their cost when run.
    """
    q, k, v = ins[:3]
    if not (q.is_static and k.is_static and v.is_static):
        return OpCost(0, _bytes(ins), _bytes(outs))
    b, hq, length, e = q.shape
    scores = b * hq * length * k.shape[2]
    return OpCost(scores * (2 * e + 2 * v.shape[3] + 5), _bytes(ins), _bytes(outs))


OPS: list[OpSpec] = [
    OpSpec(
        "LinearAttention",
        _linear_attention,
        _linear_attention_shape,
        _linear_attention_cost,
        family="attention",
    ),
    OpSpec(
        "CausalConvWithState",
        _causal_conv,
        _causal_conv_shape,
        _causal_conv_cost,
        family="attention",
    ),
    OpSpec(
        "FlexAttention",
        _flex_attention,
        _flex_attention_shape,
        _flex_attention_cost,
        domain="ai.onnx.preview",
        family="attention",
    ),
]
