"""Passes that are plain functions over the graph (dead code, folding, CSE...).

A :class:`FunctionPass` wraps ``transform(model, context) -> bool``. The pass manager diffs the
graph around it and reports one :class:`RewriteEvent` with every node it removed or added, so
such passes need no bookkeeping of their own. Nodes a function pass creates inherit the
provenance of everything it removed in that run (passes that create nodes should be rules).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from engine.passes.events import PassContext, RewriteEvent
from engine.passes.provenance import inherit_provenance
from engine.passes.rewrite import ensure_opset_imports

Transform = Callable[[ir.Model, PassContext], bool]


def function_source(function: Callable[..., object]) -> str:
    """'engine/passes/module.py:LINE' of a function ('' when unknown)."""
    try:
        path = inspect.getsourcefile(function) or ""
        line = inspect.getsourcelines(function)[1]
    except (OSError, TypeError):
        return ""
    if "/engine/" in path:
        path = path[path.index("/engine/") + 1 :]
    return f"{path}:{line}"


@dataclass(frozen=True)
class FunctionPass:
    """A named graph transform reported as one step per run that changed something."""

    name: str
    transform: Transform

    def rule_names(self) -> list[str]:
        return []

    def run(self, model: ir.Model, context: PassContext) -> bool:
        before = list(model.graph)
        constants_before = set(model.graph.initializers)
        started = time.perf_counter()
        changed = self.transform(model, context)
        seconds = time.perf_counter() - started
        after = list(model.graph)
        before_ids = {id(n) for n in before}
        after_ids = {id(n) for n in after}
        removed = [n for n in before if id(n) not in after_ids]
        added = [n for n in after if id(n) not in before_ids]
        if added:
            inherit_provenance(added, removed, self.name)
            ensure_opset_imports(model, added)
        constants_after = set(model.graph.initializers)
        if removed or added or changed:
            context.rewrite(
                RewriteEvent(
                    pass_name=self.name,
                    rule=None,
                    rule_source=function_source(self.transform),
                    anchor=None,
                    removed=removed,
                    added=added,
                    seconds=seconds,
                    initializers_removed=tuple(sorted(constants_before - constants_after)),
                    initializers_added=tuple(sorted(constants_after - constants_before)),
                ),
                model,
            )
        return bool(changed or removed or added)
