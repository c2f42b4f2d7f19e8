"""Rule-based passes: onnxscript rewrite rules applied one match at a time, each one reported.

A :class:`RewritePass` holds rules as data (onnxscript ``RewriteRule``: pattern, check that
returns a reason, replacement). Unlike ``RewriteRuleSet.apply_to_model`` it applies a single
match at a time so every application becomes its own :class:`RewriteEvent` (removed and added
nodes, the anchor node, the rule's source location), stamps provenance on the new nodes, and
turns every check that refused a structural match into a :class:`WhyNot`.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir import convenience
from onnxscript.rewriter._basics import MatchingTracer, MatchResult, MatchStatus
from onnxscript.rewriter._rewrite_rule import RewriteRule

from engine.passes.events import PassContext, RewriteEvent, WhyNot
from engine.passes.provenance import inherit_provenance


def rule_source(rule: RewriteRule) -> str:
    """'path/to/module.py:LINE' of the rule's replacement function ('' when unknown)."""
    function = getattr(getattr(rule, "_replacement_pattern", None), "_function", None)
    if function is None:
        return ""
    return _source_of(getattr(function, "__func__", function))


@functools.cache
def _source_of(function: Any) -> str:
    """Source location of a function (cached: reading source files is slow)."""
    try:
        path = inspect.getsourcefile(function) or ""
        line = inspect.getsourcelines(function)[1]
    except (OSError, TypeError):
        return ""
    for marker in ("site-packages/", "/engine/"):
        if marker in path:
            path = path[path.index(marker) + (len(marker) if marker == "site-packages/" else 1) :]
            break
    return f"{path}:{line}"


#: A check refusing with this reason is not reporting a near match (rules with broad patterns,
#: such as "any Mul", refuse most nodes they see); no WhyNot is recorded for it.
NOT_A_NEAR_MATCH = "<not a near match>"


class _WhyNotTracer(MatchingTracer):
    """Collects checks that refused a structural match (status CONDITION/REPLACEMENT_FAILED)."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[tuple[ir.Node, str]] = []

    def log(
        self,
        rule: RewriteRule,
        container: ir.Graph | ir.Function,
        node: ir.Node,
        match_result: MatchResult,
        status: MatchStatus,
    ) -> None:
        refused = status in (MatchStatus.CONDITION_FAILED, MatchStatus.REPLACEMENT_FAILED)
        if refused and match_result.reason != NOT_A_NEAR_MATCH:
            self.refusals.append((node, match_result.reason or "the rule's check refused"))


@dataclass(frozen=True)
class RewritePass:
    """A named set of rewrite rules, applied to a fixed point (or ``max_sweeps`` sweeps)."""

    name: str
    rules: tuple[RewriteRule, ...]
    max_sweeps: int = 8

    def rule_names(self) -> list[str]:
        return [str(rule.name) for rule in self.rules]

    def run(self, model: ir.Model, context: PassContext) -> bool:
        """Apply every enabled rule until none fires; True when the graph changed."""
        rules = [r for r in self.rules if context.rule_enabled(str(r.name))]
        changed = False
        for _ in range(self.max_sweeps):
            if not self._sweep(model, rules, context):
                break
            changed = True
        return changed

    def apply_at(self, model: ir.Model, rule_name: str, anchor: str, context: PassContext) -> bool:
        """Apply one named rule at the node named ``anchor`` (used to replay recorded steps)."""
        rule = next((r for r in self.rules if r.name == rule_name), None)
        node = next((n for n in model.graph if n.name == anchor), None)
        if rule is None or node is None:
            return False
        return self._try(model, rule, node, context, report_refusals=False)

    def _sweep(self, model: ir.Model, rules: Sequence[RewriteRule], context: PassContext) -> bool:
        applied = False
        for rule in rules:
            if rule.graph_pre_visitor:
                rule.graph_pre_visitor()
        for node in list(model.graph):
            if node.graph is None:  # removed by an earlier application in this sweep
                continue
            for rule in rules:
                if self._try(model, rule, node, context, report_refusals=True):
                    applied = True
                    break
        for rule in rules:
            if rule.graph_post_visitor:
                rule.graph_post_visitor()
        return applied

    def _try(
        self,
        model: ir.Model,
        rule: RewriteRule,
        node: ir.Node,
        context: PassContext,
        report_refusals: bool,
    ) -> bool:
        graph = model.graph
        tracer = _WhyNotTracer()
        started = time.perf_counter()
        delta = rule.try_rewrite(model, graph, node, tracer=tracer)
        if delta is None:
            if report_refusals:
                for refused_at, reason in tracer.refusals:
                    context.why_not(WhyNot(str(rule.name), refused_at.name or "", reason))
            return False
        for initializer in delta.new_initializers:
            _register_initializer(graph, initializer)
        onnxscript.optimizer.basic_constant_propagation(delta.new_nodes)
        position = {id(n): i for i, n in enumerate(graph)}
        removed = sorted(delta.match.nodes, key=lambda n: position.get(id(n), -1))
        _name_new_nodes(graph, delta.new_nodes, node.name or node.op_type)
        inherit_provenance(delta.new_nodes, removed, str(rule.name))
        anchor = node.name
        convenience.replace_nodes_and_values(
            graph, node, removed, delta.new_nodes, delta.match.outputs, delta.new_outputs
        )
        ensure_opset_imports(model, delta.new_nodes)
        event = RewriteEvent(
            pass_name=self.name,
            rule=str(rule.name),
            rule_source=rule_source(rule),
            anchor=anchor,
            removed=removed,
            added=list(delta.new_nodes),
            seconds=time.perf_counter() - started,
            initializers_added=tuple(v.name or "" for v in delta.new_initializers),
        )
        context.rewrite(event, model)
        return True


def _name_new_nodes(graph: ir.Graph, nodes: Sequence[ir.Node], base: str) -> None:
    """Unique names for nodes a rule created: '<anchor>/<OpType>' (suffixed when taken)."""
    taken = {n.name for n in graph}
    for node in nodes:
        candidate = f"{base}/{node.op_type}"
        suffix = 1
        while candidate in taken:
            suffix += 1
            candidate = f"{base}/{node.op_type}_{suffix}"
        node.name = candidate
        taken.add(candidate)


def _register_initializer(graph: ir.Graph, value: ir.Value) -> None:
    """Register a rule-made initializer, renaming it when its name is already taken."""
    base = value.name or "initializer"
    name, suffix = base, 1
    while name in graph.initializers and graph.initializers[name] is not value:
        suffix += 1
        name = f"{base}_{suffix}"
    value.name = name
    if name not in graph.initializers:
        graph.register_initializer(value)


def ensure_opset_imports(model: ir.Model, nodes: Sequence[ir.Node]) -> None:
    """Import every domain the new nodes use (our ``gie`` ops are version 1)."""
    for node in nodes:
        if node.domain not in ("", "ai.onnx") and node.domain not in model.opset_imports:
            model.opset_imports[node.domain] = 1
