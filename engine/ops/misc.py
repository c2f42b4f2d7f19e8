"""Ops that fit no larger family: Dropout (inference), losses, string ops, CumProd, Col2Im."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.common import (
    declared_rule,
    elementwise_cost,
    input_elements_cost,
    same_as_input,
    spec,
)
from engine.ops.registry import Attrs, KernelContext, KernelError, OpSpec, TensorSpec

# --------------------------------------------------------------------------- Dropout


def _dropout(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Identity at inference; with training_mode the seeded mask of onnx's reference."""
    x = inputs[0]
    ratio = attrs.float("ratio", 0.5) if ctx.opset < 12 else 0.5
    if ctx.opset >= 12 and len(inputs) > 1 and inputs[1] is not None:
        ratio = float(inputs[1])
    training = bool(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else False
    if not training or ratio == 0:
        return [x, np.ones(x.shape, dtype=bool)][: ctx.output_count]
    seed = attrs.get("seed")
    mask = np.random.RandomState(seed).uniform(0, 1.0, x.shape) >= ratio
    scaled = (mask * x * (1.0 / (1.0 - ratio))).astype(x.dtype)
    return [scaled, mask][: ctx.output_count]


def _dropout_rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    return [specs[0], TensorSpec(specs[0].shape, ir.DataType.BOOL)][: ctx.output_count]


# --------------------------------------------------------------------------- losses


def _nll(
    log_prob: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    reduction: str,
    ignore_index: int | None,
) -> np.ndarray:
    """Negative log-likelihood of ``target`` classes (axis 1 of ``log_prob``)."""
    ignored = np.zeros(target.shape, bool) if ignore_index is None else target == ignore_index
    safe_target = np.where(ignored, 0, target).astype(np.int64)
    picked = np.take_along_axis(log_prob, np.expand_dims(safe_target, 1), axis=1)
    picked = np.squeeze(picked, 1)
    weights = np.ones(target.shape, log_prob.dtype) if weight is None else weight[safe_target]
    weights = np.where(ignored, 0, weights).astype(log_prob.dtype)
    loss = -picked * weights
    if reduction == "none":
        return loss.astype(log_prob.dtype)
    if reduction == "sum":
        return np.array(loss.sum(), dtype=log_prob.dtype)
    if reduction == "mean":
        return np.array(loss.sum() / weights.sum(), dtype=log_prob.dtype)
    raise KernelError(f"reduction must be none, sum or mean, got {reduction!r}")


def _nll_loss(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    log_prob, target = inputs[0], inputs[1]
    weight = inputs[2] if len(inputs) > 2 else None
    reduction = attrs.str("reduction", "mean") or "mean"
    return [_nll(log_prob, target, weight, reduction, attrs.get("ignore_index"))]


def _softmax_cross_entropy(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    scores, labels = inputs[0], inputs[1]
    weight = inputs[2] if len(inputs) > 2 else None
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_prob = (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).astype(scores.dtype)
    reduction = attrs.str("reduction", "mean") or "mean"
    loss = _nll(log_prob, labels, weight, reduction, attrs.get("ignore_index"))
    return [loss, log_prob][: ctx.output_count]


# --------------------------------------------------------------------------- strings


def _string_normalizer(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    action = attrs.str("case_change_action", "NONE")
    case_sensitive = bool(attrs.int("is_case_sensitive", 0))
    stopwords = attrs.strs("stopwords", []) or []
    words = [str(w) for w in x.ravel()]
    if case_sensitive:
        kept = [w for w in words if w not in set(stopwords)]
    else:
        lowered = {s.lower() for s in stopwords}
        kept = [w for w in words if w.lower() not in lowered]
    if action == "LOWER":
        kept = [w.lower() for w in kept]
    elif action == "UPPER":
        kept = [w.upper() for w in kept]
    result = np.array(kept or [""], dtype=object)
    return [result.reshape(1, -1) if x.ndim == 2 else result]


def _string_split(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    delimiter = attrs.str("delimiter") or None
    maxsplit = attrs.get("maxsplit")
    limit = -1 if maxsplit is None else int(maxsplit)
    pieces = [str(s).split(delimiter, limit) for s in x.ravel()]
    if delimiter is None:
        pieces = [p if p != [""] else [] for p in pieces]
    width = max((len(p) for p in pieces), default=0)
    padded = np.full((len(pieces), width), "", dtype=object)
    for row, parts in enumerate(pieces):
        padded[row, : len(parts)] = parts
    counts = np.array([len(p) for p in pieces], dtype=np.int64).reshape(x.shape)
    return [padded.reshape((*x.shape, width)), counts]


def _string_concat(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    a, b = np.broadcast_arrays(*inputs)
    return [
        np.array([str(p) + str(q) for p, q in zip(a.ravel(), b.ravel())], dtype=object).reshape(
            a.shape
        )
    ]


def _regex_full_match(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    pattern = re.compile(attrs.str("pattern") or "")
    x = inputs[0]
    matches = [pattern.fullmatch(str(s)) is not None for s in x.ravel()]
    return [np.array(matches, dtype=bool).reshape(x.shape)]


# --------------------------------------------------------------------------- CumProd, Col2Im


def _cumprod(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x, axis = inputs[0], int(np.asarray(inputs[1]).reshape(-1)[0])
    reverse = bool(attrs.int("reverse", 0))
    exclusive = bool(attrs.int("exclusive", 0))
    data = np.flip(x, axis) if reverse else x
    result = np.cumprod(data, axis=axis, dtype=x.dtype)
    if exclusive:
        ones = np.ones_like(np.take(result, [0], axis=axis))
        result = np.concatenate([ones, np.delete(result, -1, axis=axis)], axis=axis)
    return [np.flip(result, axis) if reverse else result]


def _col2im(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Sum sliding blocks [N, C*prod(block), L] back into an image [N, C, *image_shape]."""
    columns, image_shape, block_shape = inputs[0], inputs[1].tolist(), inputs[2].tolist()
    spatial = len(image_shape)
    dilations = attrs.ints("dilations", [1] * spatial) or [1] * spatial
    strides = attrs.ints("strides", [1] * spatial) or [1] * spatial
    pads = attrs.ints("pads", [0] * 2 * spatial) or [0] * 2 * spatial
    batch = columns.shape[0]
    channels = columns.shape[1] // int(np.prod(block_shape))
    padded = [image_shape[i] + pads[i] + pads[i + spatial] for i in range(spatial)]
    out_counts = [
        (padded[i] - dilations[i] * (block_shape[i] - 1) - 1) // strides[i] + 1
        for i in range(spatial)
    ]
    blocks = columns.reshape(batch, channels, *block_shape, *out_counts)
    image = np.zeros((batch, channels, *padded), dtype=columns.dtype)
    for kernel_index in np.ndindex(*block_shape):
        window = tuple(
            slice(k * d, k * d + s * (n - 1) + 1, s)
            for k, d, s, n in zip(kernel_index, dilations, strides, out_counts)
        )
        image[(slice(None), slice(None), *window)] += blocks[
            (slice(None), slice(None), *kernel_index)
        ]
    crop = tuple(slice(pads[i], pads[i] + image_shape[i]) for i in range(spatial))
    return [image[(slice(None), slice(None), *crop)]]


OPS: list[OpSpec] = [
    spec("Dropout", _dropout, _dropout_rule, elementwise_cost(0), "misc"),
    spec("NegativeLogLikelihoodLoss", _nll_loss, declared_rule, input_elements_cost(2), "loss"),
    spec(
        "SoftmaxCrossEntropyLoss",
        _softmax_cross_entropy,
        declared_rule,
        input_elements_cost(10),
        "loss",
    ),
    spec("StringNormalizer", _string_normalizer, declared_rule, elementwise_cost(1), "string"),
    spec("StringSplit", _string_split, declared_rule, elementwise_cost(1), "string"),
    spec("StringConcat", _string_concat, declared_rule, elementwise_cost(1), "string"),
    spec(
        "RegexFullMatch",
        _regex_full_match,
        same_as_input(0, ir.DataType.BOOL),
        elementwise_cost(1),
        "string",
    ),
    spec("CumProd", _cumprod, same_as_input(0), elementwise_cost(1), "reduce"),
    spec("Col2Im", _col2im, declared_rule, elementwise_cost(1), "conv"),
]
