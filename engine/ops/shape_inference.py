"""Propagate TensorSpecs (shape, dtype, constant value) through a graph with the ops' shape rules.

This is the engine's own shape inference: the cost model and the optimizer read it, and it is
checked against the real outputs of the reference kernels in the tests. Where a rule cannot
decide (unknown rank, data-dependent output) the value keeps what the model declared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx_ir as ir

from engine.ops.registry import (
    Attrs,
    KernelContext,
    OpRegistry,
    TensorSpec,
    default_registry,
    normalize_domain,
)


def value_dims(value: ir.Value) -> tuple[int | str | None, ...] | None:
    """The shape of a value as ints, symbolic names and None (None when the rank is unknown)."""
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else (d.value or None) for d in value.shape)


def declared_spec(
    value: ir.Value,
    dim_values: Mapping[str, int] | None = None,
    constant_limit: int | None = None,
) -> TensorSpec:
    """What the IR says about a value (from the model or ONNX shape inference).

    ``dim_values`` binds symbolic dims to sizes; a constant's array is attached as
    ``TensorSpec.value`` when it has at most ``constant_limit`` elements (any size if None).
    """
    dims = value_dims(value)
    if dims is not None and dim_values:
        dims = tuple(dim_values.get(d, d) if isinstance(d, str) else d for d in dims)
    dtype = value.type.dtype if isinstance(value.type, ir.TensorType) else None
    tensor = value.const_value
    constant = None
    if tensor is not None and (constant_limit is None or tensor.size <= constant_limit):
        constant = tensor.numpy()
    return TensorSpec(dims, dtype, constant)


def merge_declared(inferred: TensorSpec, declared: TensorSpec) -> TensorSpec:
    """Fill what a rule left open (rank, single dims, dtype) from the declared type."""
    shape = inferred.shape
    if shape is None:
        shape = declared.shape
    elif declared.shape is not None and len(declared.shape) == len(shape):
        shape = tuple(
            mine if isinstance(mine, int) or not isinstance(theirs, int) else theirs
            for mine, theirs in zip(shape, declared.shape)
        )
    return TensorSpec(shape, inferred.dtype or declared.dtype, inferred.value)


@dataclass
class SpecInference:
    """Result of :func:`infer_specs`: a spec per value, and the nodes whose rule failed."""

    specs: dict[ir.Value, TensorSpec] = field(default_factory=dict)
    rule_errors: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, value: ir.Value) -> TensorSpec:
        return self.specs[value]

    def spec_of(self, value: ir.Value) -> TensorSpec:
        """The inferred spec of ``value``, or what the IR declares when it was not inferred."""
        return self.specs.get(value) or declared_spec(value)


def is_constant(value: ir.Value | None) -> bool:
    """An omitted input, or an initializer that is not also a graph input (not overridable)."""
    return value is None or (value.const_value is not None and not value.is_graph_input())


def infer_node(
    node: ir.Node,
    input_specs: list[TensorSpec | None],
    opset: int,
    registry: OpRegistry | None = None,
) -> list[TensorSpec]:
    """Output specs of one node from its input specs, by its op's shape rule."""
    registry = registry or default_registry()
    spec = registry.lookup(node.op_type, node.domain)
    declared = [declared_spec(v) for v in node.outputs]
    if spec is None:
        return declared
    context = KernelContext(
        opset=opset,
        node_name=node.name or "",
        output_count=len(node.outputs),
        declared_outputs=declared,
    )
    return spec.shape_rule(input_specs, Attrs.from_node(node), context)  # type: ignore[arg-type]


def infer_specs(
    model: ir.Model,
    input_specs: Mapping[str, TensorSpec] | None = None,
    registry: OpRegistry | None = None,
) -> SpecInference:
    """Specs for every value of the main graph, starting from declared (or given) inputs."""
    registry = registry or default_registry()
    opsets = {normalize_domain(d): v for d, v in model.opset_imports.items()}
    result = SpecInference()
    graph = model.graph
    for value in graph.initializers.values():
        result.specs[value] = declared_spec(value)
    for value in graph.inputs:
        given = (input_specs or {}).get(value.name or "")
        result.specs[value] = given if given is not None else declared_spec(value)
    for node in graph:
        inputs = [None if v is None else result.specs.get(v, declared_spec(v)) for v in node.inputs]
        opset = opsets.get(normalize_domain(node.domain), 1)
        try:
            outputs = infer_node(node, inputs, opset, registry)
        except Exception as error:  # noqa: BLE001 - a failing rule falls back to declarations
            result.rule_errors[node.name or node.op_type] = f"{type(error).__name__}: {error}"
            outputs = [declared_spec(v) for v in node.outputs]
        for value, spec in zip(node.outputs, outputs):
            result.specs[value] = merge_declared(spec, declared_spec(value))
        for value in node.outputs[len(outputs) :]:
            result.specs[value] = declared_spec(value)
    return result
