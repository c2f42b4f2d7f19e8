"""Standard-ONNX decompositions of the engine's transformer ops (domain ``gie``).

The part of :func:`engine.quantize.decompose.decompose_gie_ops` that writes the transformer
ops back as standard ONNX:

* LayerNorm: (residual Add +) LayerNormalization, the optional second output being the
  residual stream;
* RMSNorm: ``x / sqrt(mean(x^2) + epsilon) * scale`` over the normalized axes;
* Gelu: the Erf formula or the tanh approximation;
* Attention: heads split with Reshape/Transpose, MatMul, scale, additive mask, causal Trilu
  mask, Softmax, MatMul, heads merged back.

The reference kernels compute these ops in float32 for float16/bfloat16 inputs, so narrow
inputs are cast to float32 and the results cast back (a float16 model keeps the same rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from engine.ops.registry import Attrs
from engine.quantize.decompose import DecomposeError, Emitter, emit_gelu, node_input

_NARROW_FLOATS = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _widen(em: Emitter, value: ir.Value | None, part: str) -> ir.Value | None:
    """float16/bfloat16 values cast to float32 (the transformer kernels compute in float32)."""
    if value is None or value.dtype not in _NARROW_FLOATS:
        return value
    return em.cast(value, ir.DataType.FLOAT, part)


def _narrow(em: Emitter, value: ir.Value, like: ir.Value) -> ir.Value:
    """``value`` cast back to the dtype of ``like`` when that was narrowed."""
    if like.dtype in _NARROW_FLOATS:
        return em.cast(value, like.dtype, "output_cast")
    return value


def _work_dtype(value: ir.Value) -> np.dtype:
    return np.dtype(np.float64) if value.dtype == ir.DataType.DOUBLE else np.dtype(np.float32)


def _norm_axes(em: Emitter, x: ir.Value, axis: int) -> list[int]:
    if axis < 0:
        return list(range(axis, 0))
    if x.shape is None:
        raise DecomposeError(
            f"node '{em.fused.name}': axis {axis} needs the rank of '{x.name}', which is unknown"
        )
    return list(range(axis, len(x.shape)))


def _layer_norm(em: Emitter, node: ir.Node) -> list[ir.Value]:
    x, scale, bias, residual = (node_input(node, i) for i in range(4))
    assert x is not None
    attrs = Attrs.from_node(node)
    wide = _widen(em, x, "x_cast")
    assert wide is not None
    total = wide
    if residual is not None:
        total = em.op("Add", [wide, _widen(em, residual, "residual_cast")], "residual")
    attributes = {"axis": attrs.int("axis", -1), "epsilon": attrs.float("epsilon", 1e-5)}
    inputs = [total, _widen(em, scale, "scale_cast"), _widen(em, bias, "bias_cast")]
    normalized = em.op("LayerNormalization", inputs, "layer_norm", attributes)
    outputs = [_narrow(em, normalized, x)]
    if len(node.outputs) > 1:
        stream = _narrow(em, total, x)
        if stream is x or stream is wide:
            stream = em.op("Identity", [stream], "stream")
        outputs.append(stream)
    return outputs


def _rms_norm(em: Emitter, node: ir.Node) -> list[ir.Value]:
    x, scale = node.inputs[0], node.inputs[1]
    assert x is not None and scale is not None
    attrs = Attrs.from_node(node)
    wide = _widen(em, x, "x_cast")
    assert wide is not None
    axes = _norm_axes(em, x, attrs.int("axis", -1))
    square = em.op("Mul", [wide, wide], "square")
    if em.opset >= 18:
        axes_value = em.constant(np.array(axes, dtype=np.int64), "axes")
        mean = em.op("ReduceMean", [square, axes_value], "mean", {"keepdims": 1})
    else:
        mean = em.op("ReduceMean", [square], "mean", {"axes": axes, "keepdims": 1})
    epsilon = em.scalar(attrs.float("epsilon", 1e-6), _work_dtype(wide), "epsilon")
    root = em.op("Sqrt", [em.op("Add", [mean, epsilon], "add_epsilon")], "sqrt")
    normalized = em.op("Div", [wide, root], "normalize")
    scaled = em.op("Mul", [normalized, _widen(em, scale, "scale_cast")], "scale")
    return [_narrow(em, scaled, x)]


def _gelu(em: Emitter, node: ir.Node) -> list[ir.Value]:
    x = node.inputs[0]
    assert x is not None
    wide = _widen(em, x, "x_cast")
    assert wide is not None
    approximate = Attrs.from_node(node).str("approximate", "none") or "none"
    return [_narrow(em, emit_gelu(em, wide, _work_dtype(wide), approximate, "gelu"), x)]


def _split_heads(em: Emitter, x: ir.Value, heads: int, perm: list[int], part: str) -> ir.Value:
    shape = em.constant(np.array([0, 0, heads, -1], dtype=np.int64), f"{part}_heads_shape")
    split = em.op("Reshape", [x, shape], f"{part}_split_heads")
    return em.op("Transpose", [split], f"{part}_transpose", {"perm": perm})


def _causal_mask(em: Emitter, q: ir.Value, k: ir.Value) -> ir.Value:
    """Boolean [seq_q, seq_k] mask allowing keys up to the query's position (end-aligned)."""
    seq_q = em.op("Shape", [q], "causal_seq_q", {"start": 1, "end": 2})
    seq_k = em.op("Shape", [k], "causal_seq_k", {"start": 1, "end": 2})
    dims = em.op("Concat", [seq_q, seq_k], "causal_dims", {"axis": 0})
    one = ir.tensor(np.array([1.0], dtype=np.float32), name="one")
    ones = em.op("ConstantOfShape", [dims], "causal_ones", {"value": one})
    offset = em.op("Squeeze", [em.op("Sub", [seq_k, seq_q], "causal_offset")], "causal_k")
    lower = em.op("Trilu", [ones, offset], "causal_tril", {"upper": 0})
    return em.op("Cast", [lower], "causal_allowed", {"to": int(ir.DataType.BOOL)})


def _attention(em: Emitter, node: ir.Node) -> list[ir.Value]:
    q, k, v, mask = (node_input(node, i) for i in range(4))
    assert q is not None and k is not None and v is not None
    attrs = Attrs.from_node(node)
    heads = attrs.int("num_heads")
    if "scale" in attrs:
        scale = attrs.float("scale")
    else:
        hidden = q.shape[-1] if q.shape is not None and len(q.shape) == 3 else None
        if not isinstance(hidden, int):
            raise DecomposeError(
                f"node '{node.name}': Attention without a 'scale' attribute needs the static "
                f"hidden size of '{q.name}' (1/sqrt(head_dim)), which is unknown"
            )
        scale = 1.0 / math.sqrt(hidden // heads)
    q32, k32, v32 = (_widen(em, t, f"{n}_cast") for t, n in ((q, "q"), (k, "k"), (v, "v")))
    assert q32 is not None and k32 is not None and v32 is not None
    dtype = _work_dtype(q32)
    q4 = _split_heads(em, q32, heads, [0, 2, 1, 3], "q")
    k4 = _split_heads(em, k32, heads, [0, 2, 3, 1], "k")
    v4 = _split_heads(em, v32, heads, [0, 2, 1, 3], "v")
    scores = em.op("MatMul", [q4, k4], "scores")
    scores = em.op("Mul", [scores, em.scalar(scale, dtype, "scale")], "scaled_scores")
    if mask is not None:
        additive = em.cast(mask, ir.DataType.from_numpy(dtype), "mask_cast")
        scores = em.op("Add", [scores, additive], "masked_scores")
    if attrs.int("causal", 0):
        hidden = em.scalar(-np.inf, dtype, "causal_fill")
        scores = em.op("Where", [_causal_mask(em, q32, k32), scores, hidden], "causal_scores")
    weights = em.op("Softmax", [scores], "softmax", {"axis": -1})
    context = em.op("MatMul", [weights, v4], "context")
    merged = em.op("Transpose", [context], "merge_transpose", {"perm": [0, 2, 1, 3]})
    shape = em.constant(np.array([0, 0, -1], dtype=np.int64), "merged_shape")
    return [_narrow(em, em.op("Reshape", [merged, shape], "merge_heads"), q)]


#: The decomposition of each gie transformer op: ``(emitter, node) -> replacement values``.
TRANSFORMER_DECOMPOSERS: dict[str, Callable[[Emitter, ir.Node], list[ir.Value]]] = {
    "LayerNorm": _layer_norm,
    "RMSNorm": _rms_norm,
    "Gelu": _gelu,
    "Attention": _attention,
}

__all__ = ["TRANSFORMER_DECOMPOSERS"]
