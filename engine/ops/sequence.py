"""Sequence and optional ops.

A sequence is a Python list of arrays; kernels never mutate their input lists (Loop bodies may
hold on to them). An optional holding nothing is :data:`NONE_OPTIONAL`; an omitted optional
input arrives as ``None`` and is treated the same way by the optional ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.common import declared_rule, metadata_cost, movement_cost, normalize_axis
from engine.ops.registry import (
    NONE_OPTIONAL,
    Attrs,
    KernelContext,
    KernelError,
    OpCost,
    OpSpec,
    OptionalNone,
    TensorSpec,
)

FAMILY = "sequence"


def _position(sequence: list[Any], position: Any, default: int, insert: bool = False) -> int:
    """Index into ``sequence`` from a (possibly negative) position tensor; checks the range."""
    length = len(sequence)
    index = default if position is None else int(np.asarray(position).reshape(-1)[0])
    upper = length if insert else length - 1
    if not -length <= index <= upper:
        raise KernelError(f"position {index} is out of range for a sequence of {length}")
    return index + length if index < 0 else index


def _sequence_construct(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    return [list(inputs)]


def _sequence_empty(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    return [[]]


def _sequence_at(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    sequence = inputs[0]
    return [sequence[_position(sequence, inputs[1], 0)]]


def _sequence_insert(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    sequence = list(inputs[0])
    position = inputs[2] if len(inputs) > 2 else None
    index = _position(sequence, position, len(sequence), insert=True)
    sequence.insert(index, inputs[1])
    return [sequence]


def _sequence_erase(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    sequence = list(inputs[0])
    position = inputs[1] if len(inputs) > 1 else None
    del sequence[_position(sequence, position, -1)]
    return [sequence]


def _sequence_length(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    return [np.array(len(inputs[0]), dtype=np.int64)]


def _split_to_sequence(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Split along ``axis`` into chunks of a scalar size (last one shorter), into the sizes of a
    1-D ``split``, or (no split) into length-1 pieces, squeezed when ``keepdims`` is 0."""
    x = inputs[0]
    split = inputs[1] if len(inputs) > 1 else None
    axis = normalize_axis(attrs.int("axis", 0), x.ndim)
    size = x.shape[axis]
    if split is None:
        pieces = np.split(x, size, axis=axis)
        if not attrs.int("keepdims", 1):
            pieces = [np.squeeze(p, axis=axis) for p in pieces]
        return [pieces]
    split = np.asarray(split)
    if split.ndim == 0:
        chunk = int(split)
        if chunk <= 0:
            raise KernelError(f"split size must be positive, got {chunk}")
        bounds = list(range(chunk, size, chunk))
    else:
        if int(split.sum()) != size:
            raise KernelError(f"split {split.tolist()} does not sum to axis length {size}")
        bounds = np.cumsum(split)[:-1].tolist()
    return [np.split(x, bounds, axis=axis)]


def _concat_from_sequence(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Concatenate along ``axis``, or stack along a new ``axis`` when ``new_axis`` is 1."""
    sequence = inputs[0]
    if not sequence:
        raise KernelError("ConcatFromSequence needs a non-empty sequence")
    axis = attrs.int("axis")
    if attrs.int("new_axis", 0):
        return [np.stack(sequence, axis=normalize_axis(axis, sequence[0].ndim + 1))]
    return [np.concatenate(sequence, axis=normalize_axis(axis, sequence[0].ndim))]


def _sequence_map(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Run the body on element i of every sequence input (tensors passed whole); each body
    output becomes a sequence."""
    body = attrs.graph("body")
    if ctx.run_subgraph is None:
        raise KernelError("this backend cannot run subgraphs (no run_subgraph in the context)")
    lengths = {len(v) for v in inputs if isinstance(v, list)}
    if len(lengths) != 1:
        raise KernelError(f"SequenceMap's sequences have differing lengths {sorted(lengths)}")
    length = lengths.pop()
    results: list[list[Any]] = [[] for _ in body.outputs]
    for index in range(length):
        args = [v[index] if isinstance(v, list) else v for v in inputs]
        for out, value in zip(results, ctx.run_subgraph(body, args), strict=False):
            out.append(value)
    return results


# --------------------------------------------------------------------------- optionals


def _is_empty(value: Any) -> bool:
    return value is None or isinstance(value, OptionalNone)


def _optional(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    value = inputs[0] if inputs else None
    return [NONE_OPTIONAL if value is None else value]


def _optional_has_element(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    value = inputs[0] if inputs else None
    return [np.array(not _is_empty(value))]


def _optional_get_element(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    if _is_empty(inputs[0]):
        raise KernelError("OptionalGetElement on an empty optional")
    return [inputs[0]]


# --------------------------------------------------------------------------- shape rules


def _scalar(dtype: ir.DataType) -> Any:
    def rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
        return [TensorSpec((), dtype)]

    return rule


def _concat_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    declared = declared_rule(specs, attrs, ctx)
    return declared or [TensorSpec(None, None)]


def _sequence_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    """Sequence specs carry no sizes; moving tensors in and out is what is counted."""
    return movement_cost(ins, outs, attrs)


def _op(op_type: str, kernel: Any, rule: Any = declared_rule, cost: Any = _sequence_cost) -> OpSpec:
    return OpSpec(op_type, kernel, rule, cost, family=FAMILY)


OPS: list[OpSpec] = [
    _op("SequenceConstruct", _sequence_construct),
    _op("SequenceEmpty", _sequence_empty, cost=metadata_cost),
    _op("SequenceAt", _sequence_at),
    _op("SequenceInsert", _sequence_insert),
    _op("SequenceErase", _sequence_erase),
    _op("SequenceLength", _sequence_length, _scalar(ir.DataType.INT64), metadata_cost),
    _op("SplitToSequence", _split_to_sequence),
    _op("ConcatFromSequence", _concat_from_sequence, _concat_shape),
    _op("SequenceMap", _sequence_map),
    _op("Optional", _optional),
    _op("OptionalHasElement", _optional_has_element, _scalar(ir.DataType.BOOL), metadata_cost),
    _op("OptionalGetElement", _optional_get_element),
]
