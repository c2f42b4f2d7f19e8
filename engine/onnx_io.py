"""Load ONNX models into onnx-ir, check them, and report what the engine cannot run.

:func:`load` accepts a path, the bytes of a model, or a ``ModelProto`` and returns an
``onnx_ir.Model`` ready for the passes and the reference interpreter:

* the graph is validated first (every input defined, no cycle), with errors naming the node;
* ONNX shape inference annotates every value it can;
* ``Constant`` nodes become initializers;
* initializers that IR-version < 4 models also list as graph inputs become plain constants
  (what onnxruntime does for the classic "light" models);
* model-local functions are inlined;
* unnamed nodes are named ``<OpType>_<index>``;
* external-data tensors are read from the model's folder.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir.passes.common import (
    InlinePass,
    LiftConstantsToInitializersPass,
    RemoveInitializersFromInputsPass,
)

from engine.backends.numpy_ref.interpreter import iter_nodes_recursive
from engine.ops.registry import OpRegistry, default_registry, normalize_domain

#: Default-domain opsets the engine is built and tested for; older models still load (the
#: classic opset-9 "light" models do), and kernels read the opset where semantics changed.
TESTED_OPSETS = range(11, 24)
OLDEST_OPSET = 1

#: Shape inference is skipped above this size (protobuf's 2 GB limit; use external data).
_SHAPE_INFERENCE_LIMIT_BYTES = 1_900_000_000


class ModelLoadError(ValueError):
    """The input is not a loadable ONNX model; the message says why and names the file/node."""


@dataclass(frozen=True)
class UnsupportedOp:
    """An op type present in the model with no reference kernel, and where it occurs."""

    domain: str
    op_type: str
    count: int
    node_names: tuple[str, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.domain or 'ai.onnx'}::{self.op_type}"


ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto


def load_proto(source: ModelSource) -> tuple[onnx.ModelProto, str]:
    """Read ``source`` into a ModelProto; returns it with a label naming where it came from."""
    if isinstance(source, onnx.ModelProto):
        return source, "<ModelProto>"
    if isinstance(source, bytes):
        return _parse(source, "<bytes>"), "<bytes>"
    path = Path(source)
    label = str(path)
    if not path.exists():
        raise ModelLoadError(f"{label}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{label}: is a directory, not an ONNX file")
    proto = _parse(path.read_bytes(), label)
    if any(_uses_external_data(t) for t in _all_initializers(proto.graph)):
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as error:
            raise ModelLoadError(f"{label}: cannot read external data: {error}") from error
    return proto, label


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ModelLoadError(
            f"{label}: not an ONNX model (protobuf parse failed: {error}); "
            "the file may be truncated or of another format"
        ) from error
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError(f"{label}: not an ONNX model (no IR version or no graph)")
    return proto


def _uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _all_initializers(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_initializers(subgraph)


def check_opset(proto: onnx.ModelProto, label: str) -> int:
    """The default-domain opset of the model; raises when it is outside what we can run."""
    versions = {normalize_domain(o.domain): o.version for o in proto.opset_import}
    opset = versions.get("", 0)
    newest = onnx.defs.onnx_opset_version()
    if "" in versions and not OLDEST_OPSET <= opset <= newest:
        raise ModelLoadError(
            f"{label}: opset {opset} is not supported (supported: {OLDEST_OPSET}..{newest}, "
            f"tested: {TESTED_OPSETS.start}..{TESTED_OPSETS.stop - 1})"
        )
    return opset


def check_graph(graph: onnx.GraphProto, label: str, outer: frozenset[str] = frozenset()) -> None:
    """Every node input is defined and the graph has no cycle; errors name the node."""
    defined = set(outer) | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    defined.add("")
    producers: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for output in node.output:
            if output:
                producers[output] = index
    remaining_inputs = []
    for index, node in enumerate(graph.node):
        node_label = f"node '{node.name or f'#{index}'}' ({node.op_type})"
        for name in node.input:
            if name not in defined and name not in producers:
                raise ModelLoadError(
                    f"{label}: {node_label} reads '{name}', which no node, initializer or "
                    "graph input defines (missing initializer?)"
                )
        remaining_inputs.append(
            {producers[n] for n in _node_reads(node) if n in producers and n not in defined}
        )
        for attribute in node.attribute:
            scope = frozenset(defined | set(producers))
            if attribute.type == onnx.AttributeProto.GRAPH:
                check_graph(attribute.g, label, scope)
            for subgraph in attribute.graphs:
                check_graph(subgraph, label, scope)
    cycle = _find_cycle(remaining_inputs)
    if cycle:
        names = [graph.node[i].name or f"#{i}" for i in cycle]
        raise ModelLoadError(f"{label}: the graph has a cycle through nodes {' -> '.join(names)}")
    for output in graph.output:
        if output.name not in defined and output.name not in producers:
            raise ModelLoadError(f"{label}: graph output '{output.name}' is never produced")


def _node_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads, including those its subgraphs read from the enclosing scope."""
    reads = set(node.input)
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []
        for subgraph in [*graphs, *attribute.graphs]:
            for inner in subgraph.node:
                reads |= _node_reads(inner)
    return reads


def _find_cycle(dependencies: list[set[int]]) -> list[int]:
    """A cycle in the node dependency graph as node indices (empty when acyclic)."""
    state = [0] * len(dependencies)  # 0 new, 1 on stack, 2 done
    for start in range(len(dependencies)):
        if state[start]:
            continue
        stack: list[tuple[int, list[int]]] = [(start, sorted(dependencies[start]))]
        path = [start]
        state[start] = 1
        while stack:
            node, pending = stack[-1]
            if not pending:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = pending.pop()
            if state[nxt] == 1:
                return [*path[path.index(nxt) :], nxt]
            if state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(dependencies[nxt])))
    return []


def load(source: ModelSource, infer_shapes: bool = True) -> ir.Model:
    """Load, validate and normalise an ONNX model (see the module docstring)."""
    proto, label = load_proto(source)
    check_opset(proto, label)
    check_graph(proto.graph, label)
    if infer_shapes and proto.ByteSize() < _SHAPE_INFERENCE_LIMIT_BYTES:
        try:
            proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        except (onnx.shape_inference.InferenceError, RuntimeError):
            pass  # keep the declared types; inference is a help, not a requirement
    try:
        model = ir.from_proto(proto)
    except Exception as error:
        raise ModelLoadError(f"{label}: cannot be converted to the IR: {error}") from error
    if model.functions:
        InlinePass()(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    if model.ir_version < 4:
        RemoveInitializersFromInputsPass()(model)
        model.ir_version = 4  # initializers are no longer inputs: declare the IR that allows it
    model.graph.sort()
    name_unnamed_nodes(model.graph)
    model.meta["source"] = label
    return model


def name_unnamed_nodes(graph: ir.Graph) -> int:
    """Give every unnamed node a unique, stable name '<OpType>_<index>'; returns how many.

    ONNX node names are optional (the classic light models have none); the engine names them
    on import so that reports, steps and provenance can refer to every node.
    """
    taken = {node.name for node in graph if node.name}
    count = 0
    for index, node in enumerate(graph):
        if node.name:
            continue
        candidate = f"{node.op_type}_{index}"
        while candidate in taken:
            candidate += "_"
        node.name = candidate
        taken.add(candidate)
        count += 1
    return count


def unsupported_ops(model: ir.Model, registry: OpRegistry | None = None) -> list[UnsupportedOp]:
    """Ops without a reference kernel: type, count and node names (nested graphs included)."""
    registry = registry or default_registry()
    counts: Counter[tuple[str, str]] = Counter()
    names: dict[tuple[str, str], list[str]] = {}
    for node in iter_nodes_recursive(model.graph):
        if registry.unsupported_reason(node) is None:
            continue
        key = (node.domain, node.op_type)
        counts[key] += 1
        names.setdefault(key, []).append(node.name or "<unnamed>")
    return [
        UnsupportedOp(domain, op_type, count, tuple(names[(domain, op_type)]))
        for (domain, op_type), count in sorted(counts.items())
    ]


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialise an onnx-ir model back to a ModelProto."""
    return ir.to_proto(model)


def save(model: ir.Model, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path`` atomically (nothing half-written on failure)."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.partial")
    try:
        onnx.save_model(to_proto(model), temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
