"""Layout ops that build a bigger or rearranged tensor: Expand, Tile, Pad, DepthToSpace and
SpaceToDepth.

Opset changes handled here: Pad takes pads and the constant value as inputs from opset 11 (an
``axes`` input from 18, ``wrap`` mode from 19); SpaceToDepth gains the CRD ``mode`` in opset 24.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.ops.common import broadcast_dims, elementwise_cost, movement_cost, normalize_axis
from engine.ops.registry import Attrs, KernelContext, KernelError, OpSpec, ShapeRule, TensorSpec
from engine.ops.shape_ops import Dim, const_input, has_input, int_list, unknown_spec

# --------------------------------------------------------------------------- Expand, Tile


def _expand(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    shape = np.broadcast_shapes(x.shape, tuple(int_list(inputs[1])))
    return [np.array(np.broadcast_to(x, shape))]


def _expand_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x, target = specs[0], const_input(specs, 1)
    if target is None or x.shape is None:
        rank = specs[1].shape[0] if specs[1].shape else None
        if x.shape is not None and isinstance(rank, int):
            return [unknown_spec(x.dtype, max(rank, len(x.shape)))]
        return [unknown_spec(x.dtype)]
    return [TensorSpec(broadcast_dims([x.shape, tuple(int_list(target))]), x.dtype)]


def _tile(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    return [np.tile(inputs[0], int_list(inputs[1]))]


def _tile_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x, repeats = specs[0], const_input(specs, 1)
    if x.shape is None:
        return [unknown_spec(x.dtype)]
    if repeats is None:
        return [unknown_spec(x.dtype, len(x.shape))]
    dims = tuple(
        d * r if isinstance(d, int) else None
        for d, r in zip(x.shape, int_list(repeats), strict=False)
    )
    return [TensorSpec(dims, x.dtype)]


# --------------------------------------------------------------------------- Pad

_PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _pad_widths(
    values: Sequence[Any], attrs: Attrs, ctx: KernelContext, rank: int
) -> list[tuple[int, int]] | None:
    """Per-axis (before, after) pads; None when the pads input is not known."""
    if ctx.opset < 11:
        pads = attrs.ints("pads") or attrs.ints("paddings") or []
        axes = list(range(rank))
    else:
        if values[1] is None:
            return None
        pads = int_list(values[1])
        if has_input(values, 3):
            axes = [normalize_axis(a, rank) for a in int_list(values[3])]
        else:
            axes = list(range(rank))
    if len(pads) != 2 * len(axes):
        raise KernelError(f"Pad: {len(pads)} pads for {len(axes)} axes")
    widths = [(0, 0)] * rank
    for i, axis in enumerate(axes):
        widths[axis] = (pads[i], pads[i + len(axes)])
    return widths


def _pad(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Pad (or crop, for negative pads) every axis in the mode asked for."""
    x = inputs[0]
    mode = attrs.str("mode", "constant") or "constant"
    if mode not in _PAD_MODES:
        raise KernelError(f"Pad mode '{mode}' is not supported")
    widths = _pad_widths(inputs, attrs, ctx, x.ndim)
    assert widths is not None
    crop = tuple(slice(max(-b, 0), x.shape[i] - max(-a, 0)) for i, (b, a) in enumerate(widths))
    x = x[crop]
    positive = [(max(b, 0), max(a, 0)) for b, a in widths]
    if mode != "constant":
        return [np.pad(x, positive, mode=mode)]
    if ctx.opset < 11:
        value: Any = attrs.float("value", 0.0)
    else:
        given = inputs[2] if has_input(inputs, 2) else None
        value = np.asarray(given).ravel()[0] if given is not None and given.size else 0
    return [np.pad(x, positive, mode="constant", constant_values=value).astype(x.dtype)]


def _pad_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    x = specs[0]
    if x.shape is None:
        return [unknown_spec(x.dtype)]
    values = [s.value if s is not None else None for s in specs]
    if ctx.opset >= 11 and has_input(specs, 3) and values[3] is None:
        return [unknown_spec(x.dtype, len(x.shape))]
    widths = _pad_widths(values, attrs, ctx, len(x.shape))
    if widths is None:
        return [unknown_spec(x.dtype, len(x.shape))]
    dims = tuple(
        d + b + a if isinstance(d, int) else (d if b == a == 0 else None)
        for d, (b, a) in zip(x.shape, widths, strict=True)
    )
    return [TensorSpec(dims, x.dtype)]


# --------------------------------------------------------------------------- DepthToSpace etc.


def _depth_to_space(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    b = attrs.int("blocksize")
    n, c, h, w = x.shape
    if attrs.str("mode", "DCR") == "CRD":
        tmp = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    else:
        tmp = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    return [np.ascontiguousarray(tmp).reshape(n, c // (b * b), h * b, w * b)]


def _space_to_depth(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    b = attrs.int("blocksize")
    n, c, h, w = x.shape
    perm = (0, 1, 3, 5, 2, 4) if attrs.str("mode", "DCR") == "CRD" else (0, 3, 5, 1, 2, 4)
    tmp = x.reshape(n, c, h // b, b, w // b, b).transpose(perm)
    return [np.ascontiguousarray(tmp).reshape(n, c * b * b, h // b, w // b)]


def _block_shape(to_space: bool) -> ShapeRule:
    """Shape rule of DepthToSpace (``to_space``) or SpaceToDepth."""

    def rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
        x = specs[0]
        if x.shape is None:
            return [unknown_spec(x.dtype, 4)]
        b = attrs.int("blocksize")
        n, c, h, w = x.shape

        def scale(d: Dim, up: bool) -> Dim:
            if not isinstance(d, int):
                return None
            return d * b if up else d // b

        def scale2(d: Dim, up: bool) -> Dim:
            if not isinstance(d, int):
                return None
            return d * b * b if up else d // (b * b)

        if to_space:
            return [TensorSpec((n, scale2(c, False), scale(h, True), scale(w, True)), x.dtype)]
        return [TensorSpec((n, scale2(c, True), scale(h, False), scale(w, False)), x.dtype)]

    return rule


OPS: list[OpSpec] = [
    OpSpec("Expand", _expand, _expand_shape, movement_cost, family="shape"),
    OpSpec("Tile", _tile, _tile_shape, movement_cost, family="shape"),
    OpSpec("Pad", _pad, _pad_shape, elementwise_cost(0), family="shape"),
    OpSpec("DepthToSpace", _depth_to_space, _block_shape(True), movement_cost, family="shape"),
    OpSpec("SpaceToDepth", _space_to_depth, _block_shape(False), movement_cost, family="shape"),
]
