"""The optimizer's timeline as the studio shows it: every node and edge with its lifetime.

:func:`record_timeline` optimizes a model once (engine.passes.optimize) with an instrument that
looks at the graph after every recorded step and keeps, for each node that ever existed, the
step that added it (``born``: -1 for the original graph) and the step that removed it
(``died``: None while alive at the end); the same for every edge (producer node -> consumer
node through a value). The graph after ``k`` steps is then the nodes and edges with
``born < k`` and ``died is None or died >= k``: the extension scrubs the whole timeline from
one payload, ghosting what step ``k`` removes and highlighting what it adds, with no replay.

Graph inputs and outputs are nodes of op ``Input``/``Output`` (ids ``input:<name>`` and
``output:<name>``); constants (weights) are not nodes. A node name reused after its node was
removed gets a fresh id (``name#2``) so ids are unique over the whole timeline.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx_ir as ir

from engine.ops.registry import default_registry
from engine.passes import OptimizationResult, optimize
from engine.passes.events import Instrument, RewriteEvent
from engine.passes.provenance import RULE_KEY, provenance
from engine.passes.step import Step

#: Attribute values longer than this are shortened in the payload.
ATTRIBUTE_TEXT_LIMIT = 80


@dataclass
class NodeRecord:
    """One node of the timeline (see the module docstring); ``attributes`` as short text."""

    id: str
    op: str
    domain: str
    family: str
    born: int
    died: int | None
    origins: list[str]
    rule: str | None
    attributes: dict[str, str]
    outputs: list[str]
    why_not: list[str] = field(default_factory=list)


@dataclass
class EdgeRecord:
    """One producer -> consumer connection through ``value``, with its lifetime."""

    source: str
    target: str
    value: str
    born: int
    died: int | None


@dataclass
class Timeline:
    """The recorded optimization: steps, node and edge lifetimes, the optimized model."""

    result: OptimizationResult
    nodes: dict[str, NodeRecord]
    edges: list[EdgeRecord]

    @property
    def steps(self) -> list[Step]:
        return self.result.steps

    def visible_nodes(self, position: int) -> list[NodeRecord]:
        """The nodes of the graph after ``position`` steps."""
        return [n for n in self.nodes.values() if _alive(n.born, n.died, position)]


def _alive(born: int, died: int | None, position: int) -> bool:
    return born < position and (died is None or died >= position)


def _attribute_text(attr: ir.Attr) -> str:
    value = attr.value
    if isinstance(value, ir.Graph):
        text = f"<subgraph {value.name or ''}>"
    elif isinstance(value, ir.TensorProtocol):
        text = f"<tensor {value.dtype.name.lower()}{list(value.shape)}>"
    else:
        text = str(value.value if hasattr(value, "value") else value)
    if len(text) > ATTRIBUTE_TEXT_LIMIT:
        text = text[: ATTRIBUTE_TEXT_LIMIT - 3] + "..."
    return text


class _Snapshots(Instrument):
    """Keeps node/edge lifetimes while the optimizer runs."""

    def __init__(self) -> None:
        registry = default_registry()
        self._family = {
            (spec.domain or "", spec.op_type): spec.family for spec in registry._specs.values()
        }
        self.nodes: dict[str, NodeRecord] = {}
        self.edges: list[EdgeRecord] = []
        self._current: dict[str, str] = {}  # node name -> id of the live node with that name
        self._objects: dict[str, ir.Node | str] = {}  # node name -> the live node itself
        self._live_edges: dict[tuple[str, str, str], EdgeRecord] = {}
        self._step = -1

    def family(self, node: ir.Node) -> str:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        return self._family.get((domain, node.op_type), "misc")

    def _node_ids(self, model: ir.Model) -> dict[str, ir.Node | str]:
        graph = model.graph
        found: dict[str, ir.Node | str] = {}
        for value in graph.inputs:
            if not value.is_initializer():
                found[f"input:{value.name}"] = "Input"
        for node in graph:
            found[node.name or f"{node.op_type}@{id(node)}"] = node
        for value in graph.outputs:
            found[f"output:{value.name}"] = "Output"
        return found

    def _edges(self, model: ir.Model) -> set[tuple[str, str, str]]:
        graph = model.graph
        edges: set[tuple[str, str, str]] = set()

        def source(value: ir.Value) -> str | None:
            producer = value.producer()
            if producer is not None:
                return self._current.get(producer.name or "")
            if value.is_initializer() or value.const_value is not None:
                return None
            return self._current.get(f"input:{value.name}")

        for node in graph:
            target = self._current.get(node.name or "")
            for value in node.inputs:
                origin = source(value) if value is not None else None
                if origin is not None and target is not None:
                    edges.add((origin, target, value.name or ""))  # type: ignore[union-attr]
        for value in graph.outputs:
            origin = source(value)
            target = self._current.get(f"output:{value.name}")
            if origin is not None and target is not None:
                edges.add((origin, target, value.name or ""))
        return edges

    def snapshot(self, model: ir.Model) -> None:
        found = self._node_ids(model)
        for name in list(self._current):
            # gone, or replaced by another node under the same name: that node died here
            if name not in found or found[name] is not self._objects[name]:
                self.nodes[self._current.pop(name)].died = self._step
                del self._objects[name]
        for name, node in found.items():
            if name in self._current:
                continue
            self._objects[name] = node
            node_id = name
            suffix = 1
            while node_id in self.nodes:
                suffix += 1
                node_id = f"{name}#{suffix}"
            self._current[name] = node_id
            if isinstance(node, str):  # graph input / output
                self.nodes[node_id] = NodeRecord(
                    node_id, node, "", "io", self._step, None, [], None, {}, []
                )
                continue
            self.nodes[node_id] = NodeRecord(
                id=node_id,
                op=node.op_type,
                domain=node.domain or "",
                family=self.family(node),
                born=self._step,
                died=None,
                origins=provenance(node),
                rule=node.metadata_props.get(RULE_KEY),
                attributes={k: _attribute_text(a) for k, a in node.attributes.items()},
                outputs=[v.name or "" for v in node.outputs],
            )
        edges = self._edges(model)
        for key in set(self._live_edges) - edges:
            self._live_edges.pop(key).died = self._step
        for key in sorted(edges - set(self._live_edges)):
            record = EdgeRecord(*key, self._step, None)
            self.edges.append(record)
            self._live_edges[key] = record

    def before_pipeline(self, model: ir.Model, pass_names: Iterable[str]) -> None:
        self._step = -1
        self.snapshot(model)

    def after_rewrite(self, event: RewriteEvent, model: ir.Model) -> None:
        self._step += 1
        self.snapshot(model)


def record_timeline(model: ir.Model, level: str = "O3", disabled: Iterable[str] = ()) -> Timeline:
    """Optimize ``model`` at ``level`` recording steps and lifetimes (see the module docstring)."""
    snapshots = _Snapshots()
    result = optimize(model, level, disabled=disabled, instruments=[snapshots])
    why: dict[str, list[str]] = {}
    for reason in result.why_not:
        why.setdefault(reason.node, []).append(f"{reason.rule}: {reason.reason}")
    for node_id, record in snapshots.nodes.items():
        if record.died is None:
            record.why_not = why.get(node_id, [])
    return Timeline(result, snapshots.nodes, snapshots.edges)


__all__ = ["EdgeRecord", "NodeRecord", "Timeline", "record_timeline"]
