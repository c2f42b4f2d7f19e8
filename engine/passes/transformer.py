"""O3 transformer fusions: LayerNorm, skip LayerNorm, RMSNorm, GELU and attention.

Rules are data (pattern, check with a user-facing reason, rewrite) over onnxscript's rewriter;
their fused ops live in :mod:`engine.ops.gie_transformer`. Three passes run in order:

``transformer_norms``
    ``layer_norm_decomposed`` (torch opset-13 ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul),
    ``layer_normalization`` (the ONNX op), ``layer_norm_bias`` (a following bias Add),
    ``rms_norm`` (x / sqrt(mean(x^2) + eps) * scale, Div or Reciprocal form), ``gelu_erf`` and
    ``gelu_tanh`` (every operand order of both GELU forms) -> gie::LayerNorm/RMSNorm/Gelu.
``transformer_skip_norm``
    ``skip_layer_norm`` / ``skip_layer_norm_shared``: a residual Add feeding a gie::LayerNorm
    moves into it (Residual input; when the sum is used elsewhere, its second output).
``transformer_attention``
    ``attention`` (BERT/GPT: per-tensor Reshape + Transpose head split, QK^T, scale, additive
    mask or causal Where, Softmax, PV, head merge) and ``attention_packed_qkv`` (ViT: one qkv
    projection Reshaped to [b, s, 3, heads, d], Transposed and Split) -> gie::Attention; see
    :mod:`engine.passes.transformer_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRule

from engine.passes.gelu import gelu_erf, gelu_tanh
from engine.passes.manager import GraphPass
from engine.passes.rewrite import RewritePass
from engine.passes.transformer_attention import (
    ATTENTION_RULES,
    GIE,
    RuleGroup,
    const_array,
    const_scalar,
    dims,
    fail,
    group,
    node_name,
)

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


def reduce_axes(node: ir.Node) -> list[int] | None:
    """Axes a Reduce* node reduces (attribute or constant input); None when not constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = const_array(node.inputs[1])
        return None if array is None else [int(a) for a in array.reshape(-1)]
    attr = node.attributes.get("axes")
    return [int(a) for a in attr.value] if attr is not None else None


def is_last_axis(axes: Sequence[int] | None, rank: int | None) -> bool:
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def vector_over_last_axis(value: ir.Value | None) -> bool:
    """True when ``value`` broadcasts only along the last axis (shape [..1, n]) or is unknown."""
    shape = dims(value)
    return shape is None or all(d == 1 for d in shape[:-1])


# --------------------------------------------------------------------------- LayerNorm


def _ln_pattern(op: Any, x: Any, scale: Any, eps: Any, two: Any) -> Any:
    mean = op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])
    deviation = op.Sub(x, mean)
    squared = pattern.OrValue(
        [op.Pow(deviation, two), op.Mul(deviation, deviation)],
        tag_var="square_form",
        tag_values=list(range(2)),
    )
    variance = op.ReduceMean(squared, _allow_other_inputs=True, _outputs=["variance"])
    std = op.Sqrt(op.Add(variance, eps))
    normed = pattern.OrValue(
        [op.Div(deviation, std), op.Mul(deviation, op.Reciprocal(std))],
        tag_var="norm_form",
        tag_values=list(range(2)),
    )
    return op.Mul(normed, scale, _outputs=["scaled"])


def _ln_check(
    context: Any,
    x: ir.Value,
    scale: ir.Value,
    eps: ir.Value,
    two: Any,
    mean: ir.Value,
    variance: ir.Value,
    scaled: ir.Value,
    **_: Any,
) -> MatchResult:
    where = f"LayerNorm not fused at {node_name(scaled)}"
    if x.dtype is not None and x.dtype not in FLOAT_TYPES:
        return fail(f"{where}: the input is {x.dtype}, not a float type")
    rank = len(x.shape) if x.shape is not None else None
    for reduced in (mean, variance):
        node = reduced.producer()
        axes = reduce_axes(node)
        if not is_last_axis(axes, rank) or node.attributes.get_int("keepdims", 1) != 1:
            return fail(
                f"{where}: {node.name} reduces axes {axes}, not the last axis with keepdims"
            )
    if two is not None and const_scalar(two) != 2.0:
        return fail(f"{where}: the deviation is raised to {const_scalar(two)}, not squared")
    if const_scalar(eps) is None:
        return fail(f"{where}: epsilon ({node_name(eps)}) is not a constant scalar")
    if not vector_over_last_axis(scale):
        return fail(f"{where}: the scale of shape {dims(scale)} is not a vector over the last axis")
    return MatchResult()


def _ln_rewrite(op: Any, x: ir.Value, scale: ir.Value, eps: ir.Value, **_: Any) -> Any:
    return op.LayerNorm(x, scale, _domain=GIE, axis=-1, epsilon=const_scalar(eps))


def _lnorm_pattern(op: Any, x: Any, scale: Any) -> Any:
    return op.LayerNormalization(x, scale, _allow_other_inputs=True, _outputs=["normed"])


def _lnorm_stats_pattern(op: Any, x: Any, scale: Any) -> Any:
    """All three outputs: only reached when the statistics are used (the check says so)."""
    outputs = ["normed", "mean", "inv_std_dev"]
    return op.LayerNormalization(x, scale, _allow_other_inputs=True, _outputs=outputs)


def _lnorm_check(context: Any, normed: ir.Value, **_: Any) -> MatchResult:
    node = normed.producer()
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return fail(
            f"LayerNormalization {node.name} not fused: its mean/inv-std-dev outputs are used"
        )
    if node.attributes.get_int("stash_type", 1) != 1:
        return fail(f"LayerNormalization {node.name} not fused: stash_type is not float32")
    return MatchResult()


def _lnorm_stats_rewrite(op: Any, normed: ir.Value, **_: Any) -> Any:
    return fail(f"{node_name(normed)}: gie::LayerNorm has no mean/inv-std-dev outputs")


def _lnorm_rewrite(op: Any, x: ir.Value, scale: ir.Value, normed: ir.Value, **_: Any) -> Any:
    node = normed.producer()
    bias = node.inputs[2:3]
    return op.LayerNorm(
        x,
        scale,
        *[b for b in bias if b is not None],
        _domain=GIE,
        axis=node.attributes.get_int("axis", -1),
        epsilon=node.attributes.get_float("epsilon", 1e-5),
    )


def _bias_pattern(op: Any, x: Any, scale: Any, bias: Any) -> Any:
    normed = op.LayerNorm(x, scale, _domain=GIE, _outputs=["normed"])
    return op.Add(normed, bias)


def _bias_check(context: Any, normed: ir.Value, bias: ir.Value, **_: Any) -> MatchResult:
    node = normed.producer()
    if not vector_over_last_axis(bias):
        return fail(
            f"bias not fused into {node.name}: {node_name(bias)} of shape {dims(bias)} "
            "is not a vector over the last axis"
        )
    return MatchResult()


def _bias_rewrite(
    op: Any, x: ir.Value, scale: ir.Value, bias: ir.Value, normed: ir.Value, **_: Any
) -> Any:
    attrs = normed.producer().attributes
    axis, epsilon = attrs.get_int("axis", -1), attrs.get_float("epsilon", 1e-5)
    return op.LayerNorm(x, scale, bias, _domain=GIE, axis=axis, epsilon=epsilon)


# --------------------------------------------------------------------------- skip LayerNorm


def _skip_pattern(op: Any, x: Any, residual: Any, scale: Any) -> Any:
    total = op.Add(x, residual, _outputs=["total"])
    return op.LayerNorm(total, scale, _domain=GIE, _outputs=["normed"])


def _skip_bias_pattern(op: Any, x: Any, residual: Any, scale: Any, bias: Any) -> Any:
    total = op.Add(x, residual, _outputs=["total"])
    return op.LayerNorm(total, scale, bias, _domain=GIE, _outputs=["normed"])


def _skip_shared_pattern(op: Any, x: Any, residual: Any, scale: Any) -> Any:
    total = op.Add(x, residual, _outputs=["total"])
    return op.LayerNorm(total, scale, _domain=GIE, _outputs=["normed"]), total


def _skip_shared_bias_pattern(op: Any, x: Any, residual: Any, scale: Any, bias: Any) -> Any:
    total = op.Add(x, residual, _outputs=["total"])
    return op.LayerNorm(total, scale, bias, _domain=GIE, _outputs=["normed"]), total


def _skip_check(
    context: Any, x: ir.Value, residual: ir.Value, normed: ir.Value, **_: Any
) -> MatchResult:
    node = normed.producer()
    x_dims, residual_dims = dims(x), dims(residual)
    if x_dims is not None and residual_dims is not None and len(x_dims) != len(residual_dims):
        return fail(
            f"residual not fused into {node.name}: the Add operands have ranks "
            f"{len(x_dims)} and {len(residual_dims)}"
        )
    return MatchResult()


def _skip_inputs(
    x: ir.Value, residual: ir.Value, normed: ir.Value
) -> tuple[list[Any], dict[str, Any]]:
    node = normed.producer()
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    attrs = {
        "axis": node.attributes.get_int("axis", -1),
        "epsilon": node.attributes.get_float("epsilon", 1e-5),
    }
    return [x, node.inputs[1], bias, residual], attrs


def _skip_rewrite(op: Any, x: ir.Value, residual: ir.Value, normed: ir.Value, **_: Any) -> Any:
    inputs, attrs = _skip_inputs(x, residual, normed)
    return op.LayerNorm(*inputs, _domain=GIE, **attrs)


def _skip_shared_rewrite(
    op: Any, x: ir.Value, residual: ir.Value, normed: ir.Value, **_: Any
) -> Any:
    inputs, attrs = _skip_inputs(x, residual, normed)
    return op.LayerNorm(*inputs, _domain=GIE, _outputs=2, **attrs)


# --------------------------------------------------------------------------- RMSNorm


def _rms_pattern(op: Any, x: Any, scale: Any, eps: Any, two: Any, one: Any) -> Any:
    squared = pattern.OrValue(
        [op.Pow(x, two), op.Mul(x, x)], tag_var="square_form", tag_values=list(range(2))
    )
    mean = op.ReduceMean(squared, _allow_other_inputs=True, _outputs=["mean"])
    std = op.Sqrt(op.Add(mean, eps))
    normed = pattern.OrValue(
        [op.Div(x, std), op.Mul(x, op.Reciprocal(std)), op.Mul(x, op.Div(one, std))],
        tag_var="norm_form",
        tag_values=list(range(3)),
    )
    return op.Mul(normed, scale, _outputs=["scaled"])


def _rms_check(
    context: Any,
    x: ir.Value,
    scale: ir.Value,
    eps: ir.Value,
    two: Any,
    one: Any,
    mean: ir.Value,
    scaled: ir.Value,
    **_: Any,
) -> MatchResult:
    where = f"RMSNorm not fused at {node_name(scaled)}"
    node = mean.producer()
    rank = len(x.shape) if x.shape is not None else None
    if not is_last_axis(reduce_axes(node), rank) or node.attributes.get_int("keepdims", 1) != 1:
        return fail(f"{where}: {node.name} reduces axes {reduce_axes(node)}, not the last axis")
    if two is not None and const_scalar(two) != 2.0:
        return fail(f"{where}: the input is raised to {const_scalar(two)}, not squared")
    if one is not None and const_scalar(one) != 1.0:
        return fail(f"{where}: {node_name(one)} is not the constant 1")
    if const_scalar(eps) is None:
        return fail(f"{where}: epsilon ({node_name(eps)}) is not a constant scalar")
    if not vector_over_last_axis(scale):
        return fail(f"{where}: the scale of shape {dims(scale)} is not a vector over the last axis")
    return MatchResult()


def _rms_rewrite(op: Any, x: ir.Value, scale: ir.Value, eps: ir.Value, **_: Any) -> Any:
    return op.RMSNorm(x, scale, _domain=GIE, axis=-1, epsilon=const_scalar(eps))


# --------------------------------------------------------------------------- GELU


# --------------------------------------------------------------------------- rules and passes

layer_norm_decomposed = group("layer_norm_decomposed", [_ln_pattern], _ln_rewrite, _ln_check)
layer_normalization = RuleGroup(
    "layer_normalization",
    [
        RewriteRule(_lnorm_pattern, _lnorm_rewrite, _lnorm_check, name="layer_normalization"),
        RewriteRule(
            _lnorm_stats_pattern, _lnorm_stats_rewrite, _lnorm_check, name="layer_normalization"
        ),
    ],
    commute=False,
)
layer_norm_bias = group("layer_norm_bias", [_bias_pattern], _bias_rewrite, _bias_check)
rms_norm = group("rms_norm", [_rms_pattern], _rms_rewrite, _rms_check)
skip_layer_norm = group(
    "skip_layer_norm", [_skip_bias_pattern, _skip_pattern], _skip_rewrite, _skip_check, False
)
skip_layer_norm_shared = group(
    "skip_layer_norm_shared",
    [_skip_shared_bias_pattern, _skip_shared_pattern],
    _skip_shared_rewrite,
    _skip_check,
    False,
)

NORM_RULES = (
    layer_norm_decomposed,
    layer_normalization,
    layer_norm_bias,
    rms_norm,
    gelu_erf,
    gelu_tanh,
)
SKIP_RULES = (skip_layer_norm, skip_layer_norm_shared)


TRANSFORMER_PASSES: list[GraphPass] = [
    RewritePass("transformer_norms", NORM_RULES),  # type: ignore[arg-type]
    RewritePass("transformer_skip_norm", SKIP_RULES),  # type: ignore[arg-type]
    RewritePass("transformer_attention", ATTENTION_RULES),  # type: ignore[arg-type]
]
