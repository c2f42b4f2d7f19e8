"""Canonical text of a graph (one node per line, for diffs) and per-step ONNX export.

A line reads ``name = domain::Op(input, input) {attr=value} -> output, output`` with attributes
sorted by name; tensors print as dtype[shape]. Two graphs are the same when their texts are.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from engine.onnx_io import save


def _attribute_text(attr: ir.Attr) -> str:
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return f"{value.dtype.name.lower()}[{','.join(str(d) for d in value.shape)}]"
    if isinstance(value, ir.Graph):
        return f"graph({len(list(value))} nodes)"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return str(value)


def node_line(node: ir.Node) -> str:
    """Canonical one-line form of a node."""
    op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    inputs = ", ".join("" if v is None else (v.name or "?") for v in node.inputs)
    attrs = " ".join(
        f"{name}={_attribute_text(attr)}" for name, attr in sorted(node.attributes.items())
    )
    outputs = ", ".join(v.name or "?" for v in node.outputs)
    return f"{node.name} = {op}({inputs})" + (f" {{{attrs}}}" if attrs else "") + f" -> {outputs}"


def canonical_text(model: ir.Model) -> str:
    """The graph as text: inputs, initializers (name, dtype, shape), nodes in order, outputs."""
    graph = model.graph
    lines = [f"input {v.name}: {v.type} {v.shape}" for v in graph.inputs]
    for name in sorted(graph.initializers):
        value = graph.initializers[name]
        tensor = value.const_value
        shape = "?" if tensor is None else ",".join(str(d) for d in tensor.shape)
        dtype = "?" if tensor is None else tensor.dtype.name.lower()
        lines.append(f"initializer {name}: {dtype}[{shape}]")
    lines.extend(node_line(node) for node in graph)
    lines.extend(f"output {v.name}" for v in graph.outputs)
    return "\n".join(lines) + "\n"


def export_step_model(model: ir.Model, path: str | os.PathLike[str]) -> Path:
    """Write a step's graph as ONNX (gie ops included; Netron opens it); atomic."""
    target = Path(path)
    save(model, target)
    return target
