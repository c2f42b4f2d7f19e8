"""O1 shape-chain folding.

``fold_shapes`` (a :class:`RewritePass`) handles what stays symbolic:

* ``fold_reshape_shape_chain``: Reshape(x, Concat(...)) whose target is built from constants and
  dims of tensors (Shape -> Gather/Slice -> Unsqueeze -> Concat, as exporters emit). A target dim
  that is x's own dim at the same position becomes 0 (Reshape's copy-dim, only with
  allowzero=0), one remaining unknown dim becomes -1; the Reshape then reads a constant and the
  chain dies in dead-code elimination, so the graph stays valid for any batch or sequence.
* ``fold_expand_shape_chain``: the same for Expand targets, where x's own dim becomes 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase

from engine.ops.registry import (
    normalize_domain,
)
from engine.ops.shape_inference import SpecInference, infer_specs, is_constant
from engine.passes.rewrite import NOT_A_NEAR_MATCH, RewritePass


@dataclass(frozen=True)
class DimOf:
    """Dim ``axis`` of ``value``: what ``Shape(value)[axis]`` holds at run time."""

    value: ir.Value
    axis: int


Element = int | DimOf
_PASS_THROUGH = frozenset({"Unsqueeze", "Squeeze", "Identity", "Cast"})


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or not is_constant(value):
        return None
    array = value.const_value.numpy()
    return [int(v) for v in array.reshape(-1)] if array.dtype.kind in "iu" else None


def shape_elements(value: ir.Value, specs: SpecInference, depth: int = 0) -> list[Element] | None:
    """The elements of a 1-D (or scalar) int tensor as constants and tensor dims, or None.

    Follows Shape, Gather and Slice (constant indices), Unsqueeze, Squeeze, Identity, Cast and
    Concat back to constants and ``Shape(x)`` dims.
    """
    constant = _ints(value)
    if constant is not None:
        return list(constant)
    spec = specs.spec_of(value)
    if spec.value is not None and np.asarray(spec.value).dtype.kind in "iu":
        return [int(v) for v in np.asarray(spec.value).reshape(-1)]
    node = value.producer()
    if node is None or depth > 32 or normalize_domain(node.domain) != "":
        return None
    op = node.op_type
    if op == "Shape":
        source = node.inputs[0]
        dims = specs.spec_of(source).shape if source is not None else None
        if dims is None or source is None:
            return None
        elements: list[Element] = [
            d if isinstance(d, int) else DimOf(source, i) for i, d in enumerate(dims)
        ]
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(dims))
        return elements[slice(start, end)]
    if op in _PASS_THROUGH and node.inputs[0] is not None:
        return shape_elements(node.inputs[0], specs, depth + 1)
    if op == "Concat":
        parts = [None if v is None else shape_elements(v, specs, depth + 1) for v in node.inputs]
        if any(p is None for p in parts):
            return None
        return [e for part in parts if part is not None for e in part]
    data = shape_elements(node.inputs[0], specs, depth + 1) if node.inputs[0] is not None else None
    if data is None:
        return None
    if op == "Gather" and node.attributes.get_int("axis", 0) == 0:
        indices = _ints(node.inputs[1])
        if indices is None or any(not -len(data) <= i < len(data) for i in indices):
            return None
        return [data[i] for i in indices]
    if op == "Slice":
        starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
        axes = _ints(node.inputs[3]) if len(node.inputs) > 3 else [0]
        steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else [1]
        if not starts or not ends or axes not in ([0], [-1]) or not steps or steps[0] < 1:
            return None
        return data[slice(starts[0], ends[0], steps[0])]
    return None


def _symbol(value: ir.Value, axis: int) -> str | None:
    if value.shape is None or not 0 <= axis < len(value.shape):
        return None
    dim = value.shape[axis]
    return None if isinstance(dim, int) else dim.value


def same_dim(element: DimOf, x: ir.Value, axis: int) -> bool:
    """True when ``element`` is provably dim ``axis`` of ``x`` (the same tensor's dim, or the
    same named symbolic dim)."""
    if element.value is x:
        return element.axis == axis
    symbol = _symbol(element.value, element.axis)
    return symbol is not None and symbol == _symbol(x, axis)


def _describe(element: Element) -> str:
    if isinstance(element, int):
        return str(element)
    return f"dim {element.axis} of '{element.value.name}'"


class _ShapeChainRule(RewriteRuleClassBase):
    """Shared part of the shape-chain folds: cached spec inference, element analysis."""

    op_type = ""

    def setup(self) -> None:
        self._cache: tuple[int, SpecInference] | None = None

    def specs(self, model: ir.Model) -> SpecInference:
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != id(model):
            cache = (id(model), infer_specs(model))
            self._cache = cache
        return cache[1]

    def elements(self, context: Any, shape: ir.Value) -> list[Element] | MatchResult:
        if is_constant(shape):
            return MatchResult().fail(NOT_A_NEAR_MATCH)
        elements = shape_elements(shape, self.specs(context.model))
        if elements is None:
            return MatchResult().fail(
                f"{context.root.name} ({self.op_type}) target '{shape.name}' not folded: it is "
                "not computed from constants and tensor dims (Shape, Gather, Slice, Unsqueeze, "
                "Concat)"
            )
        return elements

    def rewrite(self, op, x: ir.Value, shape: ir.Value):
        folded = op.initializer(ir.tensor(np.array(self._target, np.int64), name=self._name))
        return getattr(op, self.op_type)(x, folded, **self._attributes)


class FoldReshapeShapeChain(_ShapeChainRule):
    """Reshape(x, shape chain) -> Reshape(x, constant) with 0 for x's own dims, -1 for one other."""

    op_type = "Reshape"

    def __init__(self) -> None:
        super().__init__("fold_reshape_shape_chain")

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True)

    def check(self, context, x: ir.Value, shape: ir.Value) -> MatchResult:
        elements = self.elements(context, shape)
        if isinstance(elements, MatchResult):
            return elements
        allowzero = context.root.attributes.get_int("allowzero", 0)
        target: list[int] = []
        unknown: list[int] = []
        for axis, element in enumerate(elements):
            if isinstance(element, int):
                target.append(element)
            elif not allowzero and same_dim(element, x, axis):
                target.append(0)
            else:
                unknown.append(axis)
                target.append(-1)
        if len(unknown) > 1 or (unknown and target.count(-1) > 1):
            open_dims = ", ".join(f"{i}: {_describe(elements[i])}" for i in unknown)
            return MatchResult().fail(
                f"{context.root.name} (Reshape) target not folded: dims {open_dims} are not "
                f"provably dims of '{x.name}' at the same position, and only one dim can be -1"
            )
        self._target, self._name = target, f"{shape.name}/folded"
        self._attributes = {"allowzero": allowzero} if allowzero else {}
        return MatchResult()


class FoldExpandShapeChain(_ShapeChainRule):
    """Expand(x, shape chain) -> Expand(x, constant) with 1 where the target is x's own dim."""

    op_type = "Expand"

    def __init__(self) -> None:
        super().__init__("fold_expand_shape_chain")

    def pattern(self, op, x, shape):
        return op.Expand(x, shape)

    def check(self, context, x: ir.Value, shape: ir.Value) -> MatchResult:
        elements = self.elements(context, shape)
        if isinstance(elements, MatchResult):
            return elements
        rank = len(x.shape) if x.shape is not None else None
        target: list[int] = []
        for axis, element in enumerate(elements):
            aligned = None if rank is None else axis - (len(elements) - rank)
            if isinstance(element, int):
                target.append(element)
            elif aligned is not None and aligned >= 0 and same_dim(element, x, aligned):
                target.append(1)
            else:
                return MatchResult().fail(
                    f"{context.root.name} (Expand) target not folded: dim {axis} "
                    f"({_describe(element)}) is not provably the matching dim of '{x.name}'"
                )
        self._target, self._name, self._attributes = target, f"{shape.name}/folded", {}
        return MatchResult()


SHAPE_FOLDING = RewritePass(
    "fold_shapes", (FoldReshapeShapeChain.rule(), FoldExpandShapeChain.rule())
)
