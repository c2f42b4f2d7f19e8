"""Layout simplification: data-movement ops that cancel, merge or do nothing.

Stock onnxscript rules are reused under our names (their refusals are prefixed with the node
they refused): Transpose->Transpose merging (``merge_transpose_pair``, an Identity when the
composed permutation is the identity), identity Transpose, Reshape->Reshape merging and
Unsqueeze->Unsqueeze merging. Ours, in the same style: a Reshape to the shape it already
has, a Transpose of size-1 dims undone by a Reshape, Squeeze/Unsqueeze pairs that cancel, a
Concat of one input, a Concat of constants (folded), a Slice covering the whole tensor,
Slice->Slice merging where exact, and a Concat that rebuilds what a Split cut. Removed ops
become ``Identity`` (the cleanup pass drops them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRule, RewriteRuleClassBase
from onnxscript.rewriter.rules.common._basic_rules import (
    ReshapeReshape,
    TransposeIdentity,
    TransposeTranspose,
    UnsqueezeUnsqueeze,
)

from engine.passes.rewrite import RewritePass

_INT64_MAX = np.iinfo(np.int64).max


def _named_stock(base: type[RewriteRuleClassBase], what: str) -> type[RewriteRuleClassBase]:
    """A stock rule class whose refusals name the node: '<node> not <what>: <reason>'."""

    class Named(base):  # type: ignore[valid-type, misc]
        def check(self, context: Any, **bindings: Any) -> MatchResult:
            result = super().check(context, **bindings)
            if result:
                return result
            node = context.root.name
            return MatchResult().fail(f"{node} not {what}: {result.reason}")

    Named.__name__ = f"Named{base.__name__}"
    return Named


class _UnsqueezeUnsqueeze(UnsqueezeUnsqueeze):
    """The stock rule, with the merged axes as an initializer instead of a Constant node."""

    def rewrite(self, op: Any, x: ir.Value, axes1: ir.Value, axes2: ir.Value) -> ir.Value:
        first, second = _ints(axes1)[0], _ints(axes2)[0]  # type: ignore[index]
        axes = [first, second] if first < second else [second, first + 1]
        name = f"{x.name or 'unsqueeze'}_axes"
        return op.Unsqueeze(x, op.initializer(ir.tensor(np.array(axes, np.int64), name=name)))


def _ints(value: ir.Value | None) -> list[int] | None:
    """The integers of a constant 1-D (or scalar) tensor, None when not constant."""
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


def _dims(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (str(d) if d is not None else None) for d in value.shape]


def _fail(text: str) -> MatchResult:
    return MatchResult().fail(text)


class IdentityReshape(RewriteRuleClassBase):
    """``Reshape(x, shape)`` whose target is the shape ``x`` already has -> Identity."""

    def pattern(self, op: Any, x: ir.Value, shape: ir.Value) -> ir.Value:
        return op.Reshape(x, shape)

    def check(self, context: Any, x: ir.Value, shape: ir.Value, **_: Any) -> MatchResult:
        node = context.root.name
        target = _ints(shape)
        dims = _dims(x)
        if target is None:
            return _fail(f"{node} not removed: the target shape is not a constant")
        if dims is None or len(dims) != len(target):
            return _fail(f"{node} not removed: it changes the rank (or the rank is unknown)")
        allowzero = context.root.attributes.get_int("allowzero", 0)
        unresolved = 0
        for dim, wanted in zip(dims, target):
            if wanted == -1:
                unresolved += 1
            elif not ((wanted == 0 and not allowzero) or dim == wanted):
                return _fail(f"{node} not removed: it reshapes {dims} to {target}")
        if unresolved > 1:
            return _fail(f"{node} not removed: target {target} has several -1")
        return MatchResult()

    def rewrite(self, op: Any, x: ir.Value, shape: ir.Value, **_: Any) -> ir.Value:
        return op.Identity(x)


class TransposeReshape(RewriteRuleClassBase):
    """``Reshape(Transpose(x), shape)`` back to x's shape where the Transpose only moved
    size-1 dims (so the data order never changed) -> Identity."""

    def pattern(self, op: Any, x: ir.Value, shape: ir.Value) -> ir.Value:
        return op.Reshape(op.Transpose(x, _outputs=["moved"]), shape)

    def check(self, context: Any, x: ir.Value, shape: ir.Value, **_: Any) -> MatchResult:
        node = context.root.name
        transpose = next(n for n in context.nodes if n.op_type == "Transpose")
        dims, target = _dims(x), _ints(shape)
        if dims is None or not all(isinstance(d, int) for d in dims) or target is None:
            return _fail(f"{node} not removed: shapes not static or target not constant")
        rank = len(dims)
        perm = transpose.attributes.get_ints("perm", list(range(rank))[::-1])
        kept = [axis for axis in perm if dims[axis] != 1]
        if kept != sorted(kept):
            return _fail(f"{node} not removed: {transpose.name} reorders the data")
        moved = [dims[axis] for axis in perm]
        resolved = [moved[i] if t == 0 and i < rank else t for i, t in enumerate(target)]
        if -1 in resolved and resolved.count(-1) == 1:
            known = int(np.prod([d for d in resolved if d != -1]))
            resolved[resolved.index(-1)] = int(np.prod(dims)) // max(known, 1)
        if resolved != dims:
            return _fail(f"{node} not removed: it reshapes to {target}, not back to {dims}")
        return MatchResult()

    def rewrite(self, op: Any, x: ir.Value, shape: ir.Value, **_: Any) -> ir.Value:
        return op.Identity(x)


def _normalized(axes: Sequence[int], rank: int) -> list[int]:
    return sorted(a + rank if a < 0 else a for a in axes)


class SqueezeUnsqueeze(RewriteRuleClassBase):
    """``Unsqueeze(Squeeze(x, axes), axes)`` -> Identity (same axes, opset 13+ form)."""

    def pattern(self, op: Any, x: ir.Value, axes1: ir.Value, axes2: ir.Value) -> ir.Value:
        return op.Unsqueeze(op.Squeeze(x, axes1), axes2)

    def check(
        self, context: Any, x: ir.Value, axes1: ir.Value, axes2: ir.Value, **_: Any
    ) -> MatchResult:
        node = context.root.name
        first, second = _ints(axes1), _ints(axes2)
        if first is None or second is None or x.shape is None:
            return _fail(f"{node} not cancelled: axes not constant or input rank unknown")
        rank = len(x.shape)
        if _normalized(first, rank) != _normalized(second, rank):
            return _fail(f"{node} not cancelled: Squeeze axes {first} != Unsqueeze axes {second}")
        return MatchResult()

    def rewrite(self, op: Any, x: ir.Value, axes1: ir.Value, axes2: ir.Value, **_: Any) -> ir.Value:
        return op.Identity(x)


class UnsqueezeSqueeze(RewriteRuleClassBase):
    """``Squeeze(Unsqueeze(x, axes), axes)`` -> Identity (same axes, opset 13+ form)."""

    def pattern(self, op: Any, x: ir.Value, axes1: ir.Value, axes2: ir.Value) -> ir.Value:
        return op.Squeeze(op.Unsqueeze(x, axes1), axes2)

    def check(
        self, context: Any, x: ir.Value, axes1: ir.Value, axes2: ir.Value, **_: Any
    ) -> MatchResult:
        node = context.root.name
        first, second = _ints(axes1), _ints(axes2)
        if first is None or second is None or x.shape is None:
            return _fail(f"{node} not cancelled: axes not constant or input rank unknown")
        rank = len(x.shape) + len(first)
        if _normalized(first, rank) != _normalized(second, rank):
            return _fail(f"{node} not cancelled: Unsqueeze axes {first} != Squeeze axes {second}")
        return MatchResult()

    def rewrite(self, op: Any, x: ir.Value, axes1: ir.Value, axes2: ir.Value, **_: Any) -> ir.Value:
        return op.Identity(x)


class SingleInputConcat(RewriteRuleClassBase):
    """``Concat(x)`` of a single input -> Identity."""

    def pattern(self, op: Any, x: ir.Value) -> ir.Value:
        return op.Concat(x)

    def rewrite(self, op: Any, x: ir.Value, **_: Any) -> ir.Value:
        return op.Identity(x)


class ConstantConcat(RewriteRuleClassBase):
    """``Concat`` whose inputs are all constants -> one initializer (through an Identity)."""

    def pattern(self, op: Any, x: ir.Value) -> ir.Value:
        return op.Concat(x, _allow_other_inputs=True)

    def check(self, context: Any, x: ir.Value, **_: Any) -> MatchResult:
        node = context.root
        graph_inputs = set(node.graph.inputs) if node.graph is not None else set()
        for index, value in enumerate(node.inputs):
            if value is None or value.const_value is None or value in graph_inputs:
                name = value.name if value is not None else ""
                return _fail(f"{node.name} not folded: input {index} '{name}' is not a constant")
        arrays = [v.const_value.numpy() for v in node.inputs]  # type: ignore[union-attr]
        self._folded = np.concatenate(arrays, axis=node.attributes.get_int("axis", 0))
        self._name = f"{node.outputs[0].name or node.name}_folded"
        return MatchResult()

    def rewrite(self, op: Any, x: ir.Value, **_: Any) -> ir.Value:
        return op.Identity(op.initializer(ir.tensor(self._folded, name=self._name)))


def _slice_params(node: ir.Node) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(starts, ends, axes, steps) of a Slice with constant parameters, else None."""
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    if starts is None or ends is None:
        return None
    axes = _ints(inputs[3]) if inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if inputs[4] is not None else [1] * len(starts)
    if axes is None or steps is None:
        return None
    return starts, ends, axes, steps


def _clamp(index: int, dim: int) -> int:
    """A Slice bound resolved against ``dim`` (negative from the end, clamped to [0, dim])."""
    if index < 0:
        index += dim
    return min(max(index, 0), dim)


class FullSlice(RewriteRuleClassBase):
    """A ``Slice`` with step 1 that keeps every element -> Identity."""

    def pattern(self, op: Any, x: ir.Value, starts: ir.Value, ends: ir.Value) -> ir.Value:
        return op.Slice(x, starts, ends, _allow_other_inputs=True)

    def check(
        self, context: Any, x: ir.Value, starts: ir.Value, ends: ir.Value, **_: Any
    ) -> MatchResult:
        node = context.root
        params = _slice_params(node)
        dims = _dims(x)
        if params is None or dims is None:
            return _fail(f"{node.name} not removed: slice parameters or input rank unknown")
        for start, end, axis, step in zip(*params):
            dim = dims[axis]
            if step != 1:
                return _fail(f"{node.name} not removed: step {step} on axis {axis}")
            whole_end = end >= _INT64_MAX // 2 or (isinstance(dim, int) and end >= dim)
            whole_start = start == 0 or (isinstance(dim, int) and _clamp(start, dim) == 0)
            if not (whole_start and whole_end):
                return _fail(f"{node.name} not removed: it keeps [{start}:{end}] of axis {axis}")
        return MatchResult()

    def rewrite(self, op: Any, x: ir.Value, starts: ir.Value, ends: ir.Value, **_: Any) -> ir.Value:
        return op.Identity(x)


class SliceSlice(RewriteRuleClassBase):
    """``Slice(Slice(x))`` -> one Slice: disjoint axes, or step-1 on static shared axes."""

    def pattern(self, op: Any, x: ir.Value, s1: ir.Value, e1: ir.Value) -> ir.Value:
        inner = op.Slice(x, s1, e1, _allow_other_inputs=True, _outputs=["mid"])
        return op.Slice(inner, _allow_other_inputs=True)

    def check(self, context: Any, x: ir.Value, s1: ir.Value, e1: ir.Value, **_: Any) -> MatchResult:
        outer = context.root
        inner = next(n for n in context.nodes if n is not outer)
        name = outer.name
        first, second, dims = _slice_params(inner), _slice_params(outer), _dims(x)
        if first is None or second is None or dims is None:
            return _fail(f"{name} not merged: slice parameters or input rank unknown")
        rank = len(dims)
        merged: dict[int, list[int]] = {}
        for start, end, axis, step in zip(*first):
            merged[axis % rank] = [start, end, step]
        for start, end, axis, step in zip(*second):
            axis %= rank
            if axis not in merged:
                merged[axis] = [start, end, step]
                continue
            dim = dims[axis]
            s0, e0, st0 = merged[axis]
            if st0 != 1 or step != 1 or not isinstance(dim, int):
                return _fail(
                    f"{name} not merged: axis {axis} sliced twice with a step or a dynamic dim"
                )
            begin = _clamp(s0, dim)
            length = max(_clamp(e0, dim) - begin, 0)
            merged[axis] = [begin + _clamp(start, length), begin + _clamp(end, length), 1]
        self._merged = merged
        self._base = outer.outputs[0].name or outer.name
        return MatchResult()

    def rewrite(self, op: Any, x: ir.Value, s1: ir.Value, e1: ir.Value, **_: Any) -> ir.Value:
        axes = sorted(self._merged)

        def constant(values: list[int], role: str) -> ir.Value:
            tensor = ir.tensor(np.array(values, dtype=np.int64), name=f"{self._base}_{role}")
            return op.initializer(tensor)

        starts, ends, steps = ([self._merged[a][i] for a in axes] for i in range(3))
        return op.Slice(
            x,
            constant(starts, "starts"),
            constant(ends, "ends"),
            constant(axes, "axes"),
            constant(steps, "steps"),
        )


class SplitConcat(RewriteRuleClassBase):
    """``Concat`` of all outputs of one ``Split``, in order, on the same axis -> Identity."""

    def pattern(self, op: Any, x: ir.Value) -> ir.Value:
        return op.Concat(x, _allow_other_inputs=True)

    def check(self, context: Any, x: ir.Value, **_: Any) -> MatchResult:
        node = context.root
        split = x.producer()
        if split is None or split.op_type != "Split":
            return _fail(f"{node.name} is not a Split undone: input 0 is not made by a Split")
        if list(node.inputs) != list(split.outputs):
            return _fail(f"{node.name} is not {split.name} undone: not all its outputs in order")
        source = split.inputs[0]
        rank = len(source.shape) if source is not None and source.shape is not None else None
        if rank is None:
            return _fail(f"{node.name} not removed: the rank of {split.name}'s input is unknown")
        split_axis = split.attributes.get_int("axis", 0) % rank
        concat_axis = node.attributes.get_int("axis", 0) % rank
        if split_axis != concat_axis:
            return _fail(
                f"{node.name} not removed: {split.name} cuts axis {split_axis}, "
                f"Concat joins axis {concat_axis}"
            )
        self._source = source
        return MatchResult()

    def rewrite(self, op: Any, x: ir.Value, **_: Any) -> ir.Value:
        return op.Identity(self._source)


def _rule(cls: type[RewriteRuleClassBase], name: str) -> RewriteRule:
    return cls.rule(name=name)  # type: ignore[call-arg]


LAYOUT_RULES: tuple[RewriteRule, ...] = (
    _rule(_named_stock(TransposeTranspose, "merged with its input"), "merge_transpose_pair"),
    _rule(_named_stock(TransposeIdentity, "removed"), "remove_identity_transpose"),
    _rule(_named_stock(ReshapeReshape, "merged with its input Reshape"), "merge_reshape_pair"),
    _rule(_named_stock(_UnsqueezeUnsqueeze, "merged"), "merge_unsqueeze_pair"),
    _rule(IdentityReshape, "remove_identity_reshape"),
    _rule(TransposeReshape, "remove_identity_transpose_reshape"),
    _rule(SqueezeUnsqueeze, "cancel_squeeze_unsqueeze"),
    _rule(UnsqueezeSqueeze, "cancel_unsqueeze_squeeze"),
    _rule(SingleInputConcat, "remove_single_input_concat"),
    _rule(ConstantConcat, "fold_constant_concat"),
    _rule(SplitConcat, "remove_split_concat"),
    _rule(FullSlice, "remove_full_slice"),
    _rule(SliceSlice, "merge_slice_pair"),
)

LAYOUT_PASSES = [RewritePass("layout", LAYOUT_RULES)]
