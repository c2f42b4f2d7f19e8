"""The reference interpreter: runs any onnx-ir graph with the registry's NumPy kernels.

It is the oracle every other backend is checked against. Each graph is prepared once (kernel
lookup, attribute decoding, liveness, and precomputing nodes whose inputs are all constants,
e.g. weights built by ConstantOfShape; the tap still sees those nodes first); a run walks the
nodes in order, frees every value after its last use, optionally taps every intermediate, and
names the failing node when a kernel raises. Nested graphs (If/Loop/Scan bodies) run through
the same machinery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.registry import (
    RANDOM_OP_TYPES,
    Attrs,
    KernelContext,
    OpRegistry,
    OpSpec,
    default_registry,
    normalize_domain,
)
from engine.ops.shape_inference import declared_spec

#: ``tap(node, outputs)`` is called after every node with the values it produced.
TapCallback = Callable[[ir.Node, list[Any]], None]


class NodeExecutionError(RuntimeError):
    """A node failed while running; the message names its op, name and input shapes."""

    def __init__(self, node: ir.Node, inputs: Sequence[Any], cause: BaseException) -> None:
        self.node_name = node.name or "<unnamed>"
        self.op_type = node.op_type
        self.input_shapes = [describe_value(value) for value in inputs]
        super().__init__(
            f"node '{self.node_name}' ({self.op_type}) failed on inputs "
            f"[{', '.join(self.input_shapes)}]: {type(cause).__name__}: {cause}"
        )


class UnsupportedModelError(RuntimeError):
    """The graph contains ops the registry has no kernel for."""


class InputError(ValueError):
    """The feeds do not match the graph inputs (name, dtype or shape)."""


@dataclass(frozen=True)
class NodeTiming:
    """Wall time of one node execution in seconds."""

    node_name: str
    op_type: str
    seconds: float


@dataclass
class RunResult:
    """Graph outputs by name, plus per-node timings when profiling was asked for."""

    outputs: dict[str, Any]
    timings: list[NodeTiming] = field(default_factory=list)


@dataclass
class _Step:
    node: ir.Node
    spec: OpSpec
    attrs: Attrs
    context: KernelContext
    inputs: list[ir.Value | None]
    outputs: list[ir.Value]
    release: list[ir.Value]


@dataclass
class _Program:
    graph: ir.Graph
    steps: list[_Step]
    constants: dict[ir.Value, Any]
    captured: list[ir.Value]
    release_unused_inputs: list[ir.Value]
    precomputed: list[tuple[ir.Node, list[Any]]] = field(default_factory=list)


def describe_value(value: Any) -> str:
    """Short text for a runtime value: 'float32[1,3,224,224]', 'sequence(3)', 'None'."""
    if value is None:
        return "None"
    if isinstance(value, np.ndarray):
        return f"{value.dtype}[{','.join(str(d) for d in value.shape)}]"
    if isinstance(value, list):
        return f"sequence({len(value)})"
    return type(value).__name__


def iter_nodes_recursive(graph: ir.Graph) -> Iterator[ir.Node]:
    """Every node of ``graph`` and of its nested graphs, outer nodes first."""
    for node in graph:
        yield node
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from iter_nodes_recursive(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for subgraph in attr.value:
                    yield from iter_nodes_recursive(subgraph)


def node_subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs a node carries as attributes (If branches, Loop/Scan bodies)."""
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.value)
    return graphs


def captured_values(graph: ir.Graph) -> list[ir.Value]:
    """Values used inside ``graph`` (recursively) that it does not define itself."""
    defined: set[ir.Value] = set(graph.inputs) | set(graph.initializers.values())
    captured: dict[ir.Value, None] = {}

    def visit(current: ir.Graph) -> None:
        defined.update(current.inputs)
        defined.update(current.initializers.values())
        for node in current:
            for value in node.inputs:
                if value is not None and value not in defined:
                    captured.setdefault(value)
            for subgraph in node_subgraphs(node):
                visit(subgraph)
            defined.update(node.outputs)
        for value in current.outputs:
            if value not in defined:
                captured.setdefault(value)

    visit(graph)
    return list(captured)


class ReferenceInterpreter:
    """Prepared executor for one model on the NumPy reference kernels."""

    def __init__(self, model: ir.Model, registry: OpRegistry | None = None) -> None:
        self.model = model
        self.registry = registry or default_registry()
        self.opsets = {normalize_domain(d): v for d, v in model.opset_imports.items()}
        missing = sorted(
            {
                f"{node.domain or 'ai.onnx'}::{node.op_type}"
                for node in iter_nodes_recursive(model.graph)
                if self.registry.unsupported_reason(node)
            }
        )
        if missing:
            raise UnsupportedModelError(f"no reference kernel for: {', '.join(missing)}")
        self._programs: dict[int, _Program] = {}
        self._main = self._program(model.graph)

    # ------------------------------------------------------------------ preparation

    def _program(self, graph: ir.Graph) -> _Program:
        program = self._programs.get(id(graph))
        if program is None:
            program = self._prepare(graph)
            self._programs[id(graph)] = program
        return program

    def _prepare(self, graph: ir.Graph) -> _Program:
        nodes = list(graph)
        last_use: dict[ir.Value, int] = {}
        for index, node in enumerate(nodes):
            used = [v for v in node.inputs if v is not None]
            for subgraph in node_subgraphs(node):
                used.extend(captured_values(subgraph))
            for value in used:
                last_use[value] = index
        keep = set(graph.outputs)
        release: list[list[ir.Value]] = [[] for _ in nodes]
        for value, index in last_use.items():
            if value not in keep:
                release[index].append(value)
        steps = []
        for index, node in enumerate(nodes):
            spec = self.registry.lookup(node.op_type, node.domain)
            assert spec is not None  # checked in __init__
            for output in node.outputs:
                if output not in last_use and output not in keep:
                    release[index].append(output)
            context = KernelContext(
                opset=self.opsets.get(normalize_domain(node.domain), 1),
                node_name=node.name or "",
                output_count=len(node.outputs),
                declared_outputs=[declared_spec(v) for v in node.outputs],
            )
            steps.append(
                _Step(
                    node,
                    spec,
                    Attrs.from_node(node),
                    context,
                    list(node.inputs),
                    list(node.outputs),
                    release[index],
                )
            )
        constants = {
            value: value.const_value.numpy()
            for value in graph.initializers.values()
            if value.const_value is not None
        }
        steps, folded = self._precompute_constant_steps(steps, constants, graph)
        unused_inputs = [v for v in graph.inputs if v not in last_use and v not in keep]
        return _Program(graph, steps, constants, captured_values(graph), unused_inputs, folded)

    def _precompute_constant_steps(
        self, steps: list[_Step], constants: dict[ir.Value, Any], graph: ir.Graph
    ) -> tuple[list[_Step], list[tuple[ir.Node, list[Any]]]]:
        """Run once, at preparation, every deterministic node whose inputs are all constants.

        Their outputs join ``constants`` (as onnxruntime folds weight-building subgraphs at
        session creation); constants only those nodes read are dropped. A node that fails here
        is left to run (and report its error) at run time.
        """
        known = {v for v in constants if not v.is_graph_input()}
        runtime_steps: list[_Step] = []
        folded: list[tuple[ir.Node, list[Any]]] = []
        for step in steps:
            foldable = (
                step.node.op_type not in RANDOM_OP_TYPES
                and not node_subgraphs(step.node)
                and all(v is None or v in known for v in step.inputs)
            )
            if foldable:
                inputs = [None if v is None else constants[v] for v in step.inputs]
                try:
                    results = list(step.spec.kernel(inputs, step.attrs, step.context))
                except Exception:  # noqa: BLE001 - surfaces with the node named at run time
                    foldable = False
            if not foldable:
                runtime_steps.append(step)
                continue
            for value, result in zip(step.outputs, results):
                constants[value] = result
                known.add(value)
            folded.append((step.node, results))
        needed = set(graph.outputs) | set(graph.inputs)
        for step in runtime_steps:
            needed.update(v for v in step.inputs if v is not None)
            for subgraph in node_subgraphs(step.node):
                needed.update(captured_values(subgraph))
        for value in [v for v in constants if v not in needed]:
            del constants[value]
        return runtime_steps, folded

    # ------------------------------------------------------------------ execution

    def run(
        self,
        feeds: Mapping[str, Any],
        tap: TapCallback | None = None,
        profile: bool = False,
    ) -> RunResult:
        """Run the main graph on ``feeds`` (graph input name -> array) and return its outputs."""
        graph = self._main.graph
        env: dict[ir.Value, Any] = dict(self._main.constants)
        expected = {v.name: v for v in graph.inputs}
        unknown = sorted(set(feeds) - set(expected))
        if unknown:
            raise InputError(
                f"unknown input name(s) {unknown}; the model's inputs are {sorted(expected)}"
            )
        for name, value in expected.items():
            if name in feeds:
                env[value] = check_feed(value, feeds[name])
            elif value not in env:
                raise InputError(f"missing input '{name}' ({_tensor_spec_text(value)})")
        timings: list[NodeTiming] | None = [] if profile else None
        outputs = self._execute(self._main, env, tap, timings)
        return RunResult(
            {value.name: result for value, result in zip(graph.outputs, outputs)},
            timings or [],
        )

    def subgraph_runner(
        self, outer_env: dict[ir.Value, Any], tap: TapCallback | None = None
    ) -> Callable[[ir.Graph, Sequence[Any]], list[Any]]:
        """A ``run_subgraph(graph, inputs)`` for kernels of If/Loop/Scan nodes of this model,
        resolving the values a body captures from ``outer_env`` (the enclosing graph's values)."""

        def run_subgraph(graph: ir.Graph, inputs: Sequence[Any]) -> list[Any]:
            program = self._program(graph)
            env: dict[ir.Value, Any] = dict(program.constants)
            for value in program.captured:
                if value in outer_env:
                    env[value] = outer_env[value]
            for value, given in zip(graph.inputs, inputs):
                env[value] = given
            return self._execute(program, env, tap, None)

        return run_subgraph

    def _execute(
        self,
        program: _Program,
        env: dict[ir.Value, Any],
        tap: TapCallback | None,
        timings: list[NodeTiming] | None,
    ) -> list[Any]:
        for value in program.release_unused_inputs:
            env.pop(value, None)
        if tap is not None:
            for node, results in program.precomputed:
                tap(node, results)
        subgraph_runner = self.subgraph_runner(env, tap)
        for step in program.steps:
            inputs = [None if v is None else env[v] for v in step.inputs]
            step.context.run_subgraph = subgraph_runner
            started = time.perf_counter()
            try:
                results = step.spec.kernel(inputs, step.attrs, step.context)
            except Exception as error:
                raise NodeExecutionError(step.node, inputs, error) from error
            if timings is not None:
                timings.append(
                    NodeTiming(
                        step.node.name or "", step.node.op_type, time.perf_counter() - started
                    )
                )
            for value, result in zip(step.outputs, results):
                env[value] = result
            if tap is not None:
                tap(step.node, list(results))
            for value in step.release:
                env.pop(value, None)
        missing = [v.name for v in program.graph.outputs if v not in env]
        if missing:
            raise RuntimeError(f"graph outputs {missing} were not produced")
        return [env[value] for value in program.graph.outputs]


def _tensor_spec_text(value: ir.Value) -> str:
    spec = declared_spec(value, constant_limit=0)
    dtype = spec.dtype.name.lower() if spec.dtype is not None else "?"
    shape = (
        "?" if spec.shape is None else ",".join("?" if d is None else str(d) for d in spec.shape)
    )
    return f"{dtype}[{shape}]"


def check_feed(value: ir.Value, given: Any) -> Any:
    """Validate one feed against its graph input declaration; returns the value to use."""
    if not isinstance(value.type, ir.TensorType):
        return given
    array = given if isinstance(given, np.ndarray) else np.asarray(given)
    spec = declared_spec(value, constant_limit=0)
    if spec.dtype is not None and spec.dtype != ir.DataType.STRING:
        expected_dtype = spec.dtype.numpy()
        if array.dtype != expected_dtype:
            raise InputError(
                f"input '{value.name}' has dtype {array.dtype}, "
                f"the model expects {_tensor_spec_text(value)}"
            )
    if spec.shape is not None:
        mismatch = len(spec.shape) != array.ndim or any(
            isinstance(want, int) and want != got for want, got in zip(spec.shape, array.shape)
        )
        if mismatch:
            raise InputError(
                f"input '{value.name}' has shape {list(array.shape)}, "
                f"the model expects {_tensor_spec_text(value)}"
            )
    return array


def run_model(
    model: ir.Model,
    feeds: Mapping[str, Any],
    tap: TapCallback | None = None,
) -> dict[str, Any]:
    """Convenience: prepare and run ``model`` once, returning outputs by name."""
    return ReferenceInterpreter(model).run(feeds, tap=tap).outputs
