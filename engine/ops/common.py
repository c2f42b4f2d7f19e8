"""Building blocks shared by the op families: shape rules, cost rules and spec factories."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.registry import (
    Attrs,
    CostRule,
    Kernel,
    KernelContext,
    OpCost,
    OpSpec,
    ShapeRule,
    TensorSpec,
)

Dim = int | str | None


# --------------------------------------------------------------------------- shape helpers


def broadcast_dims(shapes: Sequence[tuple[Dim, ...]]) -> tuple[Dim, ...]:
    """NumPy-style broadcast of shapes whose dims may be symbolic (str) or unknown (None)."""
    rank = max((len(s) for s in shapes), default=0)
    result: list[Dim] = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        concrete = {d for d in dims if isinstance(d, int) and d != 1}
        if len(concrete) > 1:
            raise ValueError(f"shapes {list(shapes)} do not broadcast")
        if concrete:
            result.append(concrete.pop())
        elif any(not isinstance(d, int) for d in dims):
            symbolic = [d for d in dims if not isinstance(d, int)]
            result.append(symbolic[0] if len(set(symbolic)) == 1 else None)
        else:
            result.append(1)
    return tuple(result)


def normalize_axis(axis: int, rank: int) -> int:
    """Map a possibly negative axis into [0, rank)."""
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


# --------------------------------------------------------------------------- shape rules


def same_as_input(index: int = 0, dtype: ir.DataType | None = None) -> ShapeRule:
    """Output 0 has the shape (and dtype, unless given) of input ``index``."""

    def rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
        source = specs[index]
        return [TensorSpec(source.shape, dtype or source.dtype)]

    return rule


def broadcast_rule(dtype: ir.DataType | None = None, dtype_from: int = 0) -> ShapeRule:
    """Output 0 is the broadcast of all present inputs; dtype given or of input ``dtype_from``."""

    def rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
        present = [s for s in specs if s is not None]
        out_dtype = dtype or specs[dtype_from].dtype
        if any(s.shape is None for s in present):
            return [TensorSpec(None, out_dtype)]
        shape = broadcast_dims([s.shape for s in present])  # type: ignore[misc]
        return [TensorSpec(shape, out_dtype)]

    return rule


def declared_rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """For ops whose output shape depends on data: the types the model declared for the outputs."""
    return list(ctx.declared_outputs)


# --------------------------------------------------------------------------- cost rules


def _bytes(specs: Sequence[TensorSpec | None]) -> int:
    return sum(s.nbytes() for s in specs if s is not None)


def _numel(spec: TensorSpec | None) -> int:
    return spec.numel() if spec is not None and spec.is_static else 0


def elementwise_cost(flops_per_element: int = 1) -> CostRule:
    """Cost of an op doing ``flops_per_element`` operations per output element."""

    def cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
        flops = flops_per_element * sum(_numel(o) for o in outs)
        return OpCost(flops, _bytes(ins), _bytes(outs))

    return cost


def input_elements_cost(flops_per_element: int = 1) -> CostRule:
    """Cost proportional to the elements of input 0 (reductions, normalizations)."""

    def cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
        return OpCost(flops_per_element * _numel(ins[0]), _bytes(ins), _bytes(outs))

    return cost


def movement_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """Data movement only: reads what the outputs need (bounded by the inputs), no arithmetic."""
    written = _bytes(outs)
    return OpCost(0, min(_bytes(ins), written) if written else _bytes(ins[:1]), written)


def metadata_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """Ops that only look at shapes or produce tiny tensors (Shape, Size, Range...)."""
    return OpCost(0, 0, _bytes(outs))


# --------------------------------------------------------------------------- spec factories


def unary(
    op_type: str,
    function: Callable[[np.ndarray], np.ndarray],
    flops: int = 1,
    family: str = "elementwise",
    result_dtype: ir.DataType | None = None,
) -> OpSpec:
    """Spec of a one-input elementwise op computed by ``function``.

    The output keeps the input dtype unless ``result_dtype`` is given (e.g. BOOL for IsNaN).
    """

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        x = inputs[0]
        result = np.asarray(function(x))
        return [result if result_dtype is not None else result.astype(x.dtype, copy=False)]

    rule = same_as_input(0, result_dtype)
    return OpSpec(op_type, kernel, rule, elementwise_cost(flops), family=family)


def unary_with_attrs(
    op_type: str,
    function: Callable[[np.ndarray, Attrs], np.ndarray],
    flops: int = 1,
    family: str = "activation",
) -> OpSpec:
    """Spec of a one-input elementwise op whose function reads attributes (alpha, beta...)."""

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        x = inputs[0]
        return [np.asarray(function(x, attrs)).astype(x.dtype, copy=False)]

    return OpSpec(op_type, kernel, same_as_input(0), elementwise_cost(flops), family=family)


def spec(
    op_type: str,
    kernel: Kernel,
    shape_rule: ShapeRule = declared_rule,
    cost: CostRule = movement_cost,
    family: str = "misc",
    domain: str = "",
) -> OpSpec:
    """Spec with explicit kernel, shape rule and cost (defaults: declared shapes, data movement)."""
    return OpSpec(op_type, kernel, shape_rule, cost, domain=domain, family=family)
