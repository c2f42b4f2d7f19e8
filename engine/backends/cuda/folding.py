"""Host folding at lowering time: a CUDA engine is lowered for one set of input shapes, so
every value that depends only on shapes and constants (``Shape``, and the Gather / Concat /
Unsqueeze arithmetic of reshape targets that follows it) is computed on the host once and
becomes a constant of the launch plan, as TensorRT does with shape tensors.

:func:`fold_layer` folds a layer whose outputs shape inference already knows, ``Shape`` of a
static value, or any layer whose inputs are all known and whose outputs are small
(:data:`FOLD_LIMIT` elements: shape arithmetic, not weights, which the optimizer folded).
:func:`refresh_specs` re-derives a layer's output specs from its shape rule when inference left
them unknown but folding has since made its inputs known (a Reshape to a folded target).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnx_ir as ir

from engine.build.plan import Layer
from engine.ops.registry import TensorSpec, default_registry


class FoldState(Protocol):
    """What folding reads and writes of a lowering run."""

    specs: dict[str, TensorSpec]
    host_constants: dict[str, np.ndarray]
    graph_outputs: Sequence[str]


#: Largest output (elements) a layer with only host-known inputs is evaluated on the host
#: at lowering time (shape arithmetic, not weights: the optimizer folded those already).
FOLD_LIMIT = 4096


def host_value(state: FoldState, name: str) -> np.ndarray | None:
    if name in state.host_constants:
        return state.host_constants[name]
    spec = state.specs.get(name)
    return None if spec is None or spec.value is None else np.asarray(spec.value)


def fold_layer(state: FoldState, layer: Layer) -> bool:
    """Whether every output of ``layer`` is known on the host at these shapes (its values
    then live in ``host_constants``): from shape inference, ``Shape`` of a static value, or
    the reference kernel on host-known inputs with small outputs."""
    names = [name for name in layer.outputs if name]
    if not names or any(name in state.graph_outputs for name in names):
        return False
    values = [host_value(state, name) for name in names]
    if any(v is None for v in values):
        values = _evaluate(state, layer)
        if values is None:
            return False
    for name, value in zip(names, values):
        array = np.asarray(value)
        state.host_constants[name] = array
        state.specs[name] = TensorSpec(
            tuple(array.shape), ir.DataType.from_numpy(array.dtype), array
        )
    return True


def _evaluate(state: FoldState, layer: Layer) -> list[np.ndarray] | None:
    outs = [state.specs.get(name) for name in layer.outputs if name]
    if any(s is not None and s.is_static and s.numel() > FOLD_LIMIT for s in outs):
        return None
    if layer.qualified_op == "Shape":
        spec = state.specs.get(layer.inputs[0])
        if spec is None or not spec.is_static:
            return None
        shape = np.asarray(spec.shape, dtype=np.int64)
        end = layer.attrs.int("end", len(shape)) if "end" in layer.attrs else len(shape)
        return [shape[layer.attrs.int("start", 0) : end]]
    inputs = [None if not name else host_value(state, name) for name in layer.inputs]
    if any(name and value is None for name, value in zip(layer.inputs, inputs)):
        return None
    spec = default_registry().lookup(layer.op_type, layer.domain)
    if spec is None or layer.node.attributes.get("then_branch") is not None:
        return None
    try:
        results = list(spec.kernel(inputs, layer.attrs, layer.context))
    except Exception:  # noqa: BLE001 - not foldable here; the layer is lowered instead
        return None
    values = [np.asarray(r) for r, name in zip(results, layer.outputs) if name]
    return None if any(v.size > FOLD_LIMIT for v in values) else values


def refresh_specs(state: FoldState, layer: Layer) -> None:
    """Output specs of ``layer`` from its shape rule when inference left them unknown (their
    inputs became known by folding: Reshape to a folded target shape)."""
    if all(state.specs.get(n) is not None and state.specs[n].is_static for n in layer.outputs if n):
        return
    spec = default_registry().lookup(layer.op_type, layer.domain)
    if spec is None:
        return
    ins = []
    for name in layer.inputs:
        value = host_value(state, name) if name else None
        if value is not None:
            ins.append(TensorSpec(tuple(value.shape), ir.DataType.from_numpy(value.dtype), value))
        else:
            ins.append(state.specs.get(name) if name else None)
    try:
        outs = spec.shape_rule(ins, layer.attrs, layer.context)
    except Exception:  # noqa: BLE001 - the lowering reports the unknown shape itself
        return
    for name, out in zip(layer.outputs, outs):
        if name and out is not None and out.is_static:
            state.specs[name] = out
