"""The Plan: an optimized graph lowered to an ordered list of executable layers.

Each :class:`Layer` is one node of the optimized graph: what it computes (op, attributes, input
and output value names), where it came from (origin ONNX node names, from provenance), how it
runs (precision with the reason when it is not what was asked, chosen tactic, and every
candidate's timing), and its role: ``compute``, or ``reformat`` / ``explicit_qdq`` for the
conversion layers the precision decisions inserted (engine.build.reformat). Values are
referred to by name; ``specs`` holds each value's shape/dtype at the optimization shapes (the
``opt`` of each input profile, or the declared shapes with symbolic dims as 1), ``constants``
the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.config import Precision
from engine.ops.registry import Attrs, KernelContext, OpRegistry, TensorSpec, default_registry
from engine.ops.shape_inference import declared_spec, infer_specs
from engine.passes.provenance import provenance


@dataclass(frozen=True)
class TacticTiming:
    """One candidate's measurement: median time (ms) over ``samples`` runs; ``aborted`` when
    timing stopped early because it was clearly slower than the best so far."""

    tactic: str
    median_ms: float
    samples: int
    aborted: bool = False
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "tactic": self.tactic,
            "median_ms": self.median_ms,
            "samples": self.samples,
            "aborted": self.aborted,
            "note": self.note,
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> TacticTiming:
        return TacticTiming(
            str(data["tactic"]),
            float(data["median_ms"]),
            int(data["samples"]),
            bool(data.get("aborted", False)),
            str(data.get("note", "")),
        )


@dataclass
class Layer:
    """One executable op of the plan (see the module docstring)."""

    index: int
    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    origins: tuple[str, ...]
    node: ir.Node
    attrs: Attrs
    context: KernelContext
    precision: Precision = Precision.FP32
    tactic: str = "reference"
    candidates: list[TacticTiming] = field(default_factory=list)
    role: str = "compute"
    precision_reason: str = ""

    @property
    def qualified_op(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type

    def to_json(self) -> dict[str, Any]:
        """The layer-table row (what `gie inspect ENGINE` and the .gie manifest show)."""
        return {
            "index": self.index,
            "name": self.name,
            "op": self.qualified_op,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "origins": list(self.origins),
            "precision": self.precision.value,
            "role": self.role,
            "precision_reason": self.precision_reason,
            "tactic": self.tactic,
            "candidates": [c.to_json() for c in self.candidates],
        }


@dataclass
class Plan:
    """Ordered layers over named values, with weights and value specs."""

    model: ir.Model
    layers: list[Layer]
    inputs: list[str]
    outputs: list[str]
    constants: dict[str, np.ndarray]
    specs: dict[str, TensorSpec]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}")

    def input_specs(self, layer: Layer) -> list[TensorSpec | None]:
        return [self.specs.get(name) if name else None for name in layer.inputs]

    def output_specs(self, layer: Layer) -> list[TensorSpec | None]:
        return [self.specs.get(name) for name in layer.outputs]


def optimization_specs(
    model: ir.Model, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, TensorSpec]:
    """Input specs at the given shapes (symbolic dims of other inputs taken as 1)."""
    specs: dict[str, TensorSpec] = {}
    for value in model.graph.inputs:
        declared = declared_spec(value, constant_limit=0)
        name = value.name or ""
        if shapes and name in shapes:
            specs[name] = TensorSpec(tuple(shapes[name]), declared.dtype)
        elif declared.shape is not None:
            dims = tuple(d if isinstance(d, int) else 1 for d in declared.shape)
            specs[name] = TensorSpec(dims, declared.dtype)
        else:
            specs[name] = declared
    return specs


def lower(
    model: ir.Model,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    registry: OpRegistry | None = None,
) -> Plan:
    """Lower an (optimized) model to a Plan; ``shapes`` are the optimization input shapes."""
    registry = registry or default_registry()
    graph = model.graph
    inferred = infer_specs(model, optimization_specs(model, shapes), registry).specs
    opsets = dict(model.opset_imports)
    layers = []
    for index, node in enumerate(graph):
        if registry.lookup(node.op_type, node.domain) is None:
            raise ValueError(
                f"layer '{node.name}': no kernel for {node.domain or 'ai.onnx'}::{node.op_type}"
            )
        context = KernelContext(
            opset=opsets.get(node.domain or "", 1),
            node_name=node.name or "",
            output_count=len(node.outputs),
            declared_outputs=[inferred.get(v) or declared_spec(v) for v in node.outputs],
        )
        layers.append(
            Layer(
                index=index,
                name=node.name or f"{node.op_type}_{index}",
                op_type=node.op_type,
                domain=node.domain or "",
                inputs=tuple("" if v is None else (v.name or "") for v in node.inputs),
                outputs=tuple(v.name or "" for v in node.outputs),
                origins=tuple(provenance(node)),
                node=node,
                attrs=Attrs.from_node(node),
                context=context,
                precision=Precision(node.metadata_props.get("gie.precision", "fp32")),
                role=node.metadata_props.get("gie.role", "compute"),
                precision_reason=node.metadata_props.get("gie.reason", ""),
            )
        )
    constants = {
        name: value.const_value.numpy()
        for name, value in graph.initializers.items()
        if value.const_value is not None and not value.is_graph_input()
    }
    specs = {value.name or "": spec for value, spec in inferred.items()}
    return Plan(
        model=model,
        layers=layers,
        inputs=[v.name or "" for v in graph.inputs if v.name not in constants],
        outputs=[v.name or "" for v in graph.outputs],
        constants=constants,
        specs=specs,
    )
