"""Graph verifier run between passes: structure, naming, and that every op can be run.

Checks (each failure names the node): nodes are in topological order and every input is
defined (graph input, initializer or an earlier node); node names are unique
and non-empty; every node belongs to this graph; graph outputs are produced; every op has a
reference kernel (so any step can run on the oracle).
"""

from __future__ import annotations

import onnx_ir as ir

from engine.ops.registry import OpRegistry, default_registry


class GraphVerificationError(ValueError):
    """The graph broke an invariant; the message names the node and the invariant."""


def verify_graph(model: ir.Model, registry: OpRegistry | None = None) -> None:
    """Raise :class:`GraphVerificationError` on the first broken invariant."""
    registry = registry or default_registry()
    graph = model.graph
    defined: set[ir.Value] = set(graph.inputs) | set(graph.initializers.values())
    names: set[str] = set()
    for node in graph:
        label = f"node '{node.name}' ({node.domain + '::' if node.domain else ''}{node.op_type})"
        if not node.name:
            raise GraphVerificationError(f"a {node.op_type} node has no name")
        if node.name in names:
            raise GraphVerificationError(f"{label}: the name is used twice")
        names.add(node.name)
        if node.graph is not graph:
            raise GraphVerificationError(f"{label}: belongs to another graph")
        for index, value in enumerate(node.inputs):
            if value is None or value in defined:
                continue
            raise GraphVerificationError(
                f"{label}: input {index} '{value.name}' is used before it is defined"
            )
        reason = registry.unsupported_reason(node)
        if reason:
            raise GraphVerificationError(f"{label}: {reason}")
        defined.update(node.outputs)
    for value in graph.outputs:
        if value not in defined:
            raise GraphVerificationError(f"graph output '{value.name}' is never produced")
