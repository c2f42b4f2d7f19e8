"""The pass manager: runs a pipeline of passes, verifies between them, feeds the instruments.

Errors say which pass failed and which ran before it ("pass X failed after [A, B, C]: ...").
Passes and rules are disabled by name. The :class:`StepRecorder` instrument turns rewrite
events into :class:`~engine.passes.step.Step` records (with cost estimates and, optionally, a
numeric check through the reference backend) and keeps the "why not" reasons of rules that
nearly matched nodes still in the graph.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from engine.cost_model import GPU_FP32, DeviceProfile, GraphCost, graph_cost
from engine.ops.registry import OpRegistry, default_registry
from engine.passes.events import Instrument, PassContext, RewriteEvent, WhyNot
from engine.passes.provenance import provenance
from engine.passes.step import NumericCheck, Step
from engine.passes.verifier import verify_graph

WHY_NOT_KEY = "gie.why_not"


class GraphPass(Protocol):
    """What the manager runs: a named, in-place transformation of the graph."""

    name: str

    def run(self, model: ir.Model, context: PassContext) -> bool: ...

    def rule_names(self) -> list[str]: ...


class PassFailedError(RuntimeError):
    """A pass raised or left a graph the verifier rejects."""

    def __init__(self, pass_name: str, completed: Sequence[str], cause: BaseException) -> None:
        self.pass_name = pass_name
        self.completed = list(completed)
        super().__init__(
            f"pass {pass_name} failed after [{', '.join(completed)}]: "
            f"{type(cause).__name__}: {cause}"
        )


@dataclass
class PassManager:
    """Runs ``passes`` in order on a model, in place."""

    passes: Sequence[GraphPass]
    instruments: Sequence[Instrument] = ()
    disabled: frozenset[str] = frozenset()
    registry: OpRegistry | None = None
    verify: bool = True

    def active_passes(self) -> list[GraphPass]:
        return [p for p in self.passes if p.name not in self.disabled]

    def run(self, model: ir.Model) -> bool:
        """Run the pipeline; True when any pass changed the graph."""
        registry = self.registry or default_registry()
        passes = self.active_passes()
        instruments = list(self.instruments)
        for instrument in instruments:
            instrument.before_pipeline(model, [p.name for p in passes])
        completed: list[str] = []
        changed_any = False
        for graph_pass in passes:
            context = PassContext(registry, instruments, self.disabled, graph_pass.name)
            for instrument in instruments:
                instrument.before_pass(graph_pass.name, model)
            started = time.perf_counter()
            try:
                changed = graph_pass.run(model, context)
                if self.verify:
                    verify_graph(model, registry)
            except Exception as error:
                raise PassFailedError(graph_pass.name, completed, error) from error
            seconds = time.perf_counter() - started
            for instrument in instruments:
                instrument.after_pass(graph_pass.name, model, changed, seconds)
            completed.append(graph_pass.name)
            changed_any = changed_any or changed
        for instrument in instruments:
            instrument.after_pipeline(model)
        return changed_any


@dataclass
class StepRecorder(Instrument):
    """Records every rewrite as a Step, with cost estimates and an optional numeric check.

    ``check_feeds`` (input name -> array) turns on the numeric check: after each step the
    reference backend reruns the graph and the outputs are compared with the previous step's.
    ``estimate_costs=False`` skips the per-step cost estimate (only node counts are recorded),
    which is what a build wants: the estimate re-infers shapes for the whole graph every step.
    """

    device: DeviceProfile = GPU_FP32
    estimate_costs: bool = True
    check_feeds: Mapping[str, np.ndarray] | None = None
    registry: OpRegistry | None = None
    steps: list[Step] = field(default_factory=list)
    why_not: dict[tuple[str, str], WhyNot] = field(default_factory=dict)
    _cost: GraphCost | None = None
    _outputs: list[Any] | None = None

    def _graph_cost(self, model: ir.Model) -> GraphCost:
        if not self.estimate_costs:
            return GraphCost(len(model.graph), 0, 0, 0.0, 0)
        return graph_cost(model, self.device, self.registry)

    def before_pipeline(self, model: ir.Model, pass_names: Sequence[str]) -> None:
        self._cost = self._graph_cost(model)
        if self.check_feeds is not None:
            self._outputs = self._run(model)

    def after_rewrite(self, event: RewriteEvent, model: ir.Model) -> None:
        before = self._cost or self._graph_cost(model)
        after = self._graph_cost(model)
        check = None
        if self.check_feeds is not None:
            outputs = self._run(model)
            check = _compare(self._outputs or [], outputs)
            self._outputs = outputs
        self.steps.append(
            Step(
                index=len(self.steps),
                pass_name=event.pass_name,
                rule=event.rule,
                rule_source=event.rule_source,
                anchor=event.anchor,
                removed=tuple(n.name or "" for n in event.removed),
                added=tuple(n.name or "" for n in event.added),
                provenance={n.name or "": tuple(provenance(n)) for n in event.added},
                before=before,
                after=after,
                seconds=event.seconds,
                numeric_check=check,
                initializers_removed=event.initializers_removed,
                initializers_added=event.initializers_added,
            )
        )
        self._cost = after

    def on_why_not(self, why: WhyNot) -> None:
        self.why_not[(why.rule, why.node)] = why

    def after_pipeline(self, model: ir.Model) -> None:
        """Keep the reasons of nodes still present and attach them to those nodes."""
        present = {node.name: node for node in model.graph}
        kept = {key: why for key, why in self.why_not.items() if why.node in present}
        self.why_not = kept
        by_node: dict[str, list[dict[str, str]]] = {}
        for why in kept.values():
            by_node.setdefault(why.node, []).append(why.to_json())
        for name, reasons in by_node.items():
            present[name].metadata_props[WHY_NOT_KEY] = json.dumps(reasons)

    def _run(self, model: ir.Model) -> list[Any]:
        from engine.backends.numpy_ref import ReferenceInterpreter

        interpreter = ReferenceInterpreter(model, self.registry)
        result = interpreter.run(dict(self.check_feeds or {}))
        return list(result.outputs.values())


def _compare(previous: Sequence[Any], current: Sequence[Any]) -> NumericCheck:
    worst_abs = worst_rel = 0.0
    for old, new in zip(previous, current):
        if not isinstance(old, np.ndarray) or old.dtype.kind not in "fc":
            continue
        difference = np.abs(new.astype(np.float64) - old.astype(np.float64))
        if difference.size:
            worst_abs = max(worst_abs, float(difference.max()))
            scale = np.maximum(np.abs(old.astype(np.float64)), 1e-12)
            worst_rel = max(worst_rel, float((difference / scale).max()))
    return NumericCheck(worst_abs, worst_rel)


def disabled_set(names: Iterable[str]) -> frozenset[str]:
    """Normalise user-given pass/rule names to disable."""
    return frozenset(n.strip() for n in names if n and n.strip())
