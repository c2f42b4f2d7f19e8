"""O1 constant folding, with the engine's own reference kernels.

``fold_constants`` (:class:`ConstantFoldPass`) walks the graph once in order and turns into
initializers

* ``fold_constant_node``: every deterministic node (no random op or Dropout, no subgraph, no
  Quantize/DequantizeLinear, which keep quantized weights in their int8 form) whose inputs are
  all constants (initializers that are not graph inputs), ConstantOfShape included, computed by
  the registry's reference kernel;
* ``fold_static_shape``: Shape/Size of a value whose (inferred) shape is static.

Outputs over ``max_elements`` elements are not folded (a WhyNot says so). Each fold is a step
anchored at its node; when more than ``max_single_steps`` nodes would fold (the light ResNet-50
builds its 239 weights with ConstantOfShape) the run is one step instead, to keep recording cheap.

Shape-chain folding (``fold_shapes``) lives in fold_shapes.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.backends.numpy_ref.interpreter import node_subgraphs
from engine.ops.registry import (
    RANDOM_OP_TYPES,
    Attrs,
    KernelContext,
    OpRegistry,
    TensorSpec,
    dtype_of_array,
    normalize_domain,
)
from engine.ops.shape_inference import (
    SpecInference,
    declared_spec,
    infer_node,
    infer_specs,
    is_constant,
)
from engine.passes.cleanup import DEAD_CODE_ELIMINATION, DEDUPLICATE_INITIALIZERS
from engine.passes.events import PassContext, RewriteEvent, WhyNot
from engine.passes.fold_shapes import SHAPE_FOLDING
from engine.passes.function_pass import function_source
from engine.passes.manager import GraphPass

FOLD_CONSTANT_NODE = "fold_constant_node"
FOLD_STATIC_SHAPE = "fold_static_shape"
#: Ops never folded: quantization boundaries stay so quantized weights keep their int form;
#: Dropout draws a random mask in training mode.
KEEP_OPS = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "Dropout"})
DEFAULT_MAX_ELEMENTS = 2**28


def _opset(model: ir.Model, node: ir.Node) -> int:
    domain = normalize_domain(node.domain)
    for name, version in model.opset_imports.items():
        if normalize_domain(name) == domain:
            return int(version)
    return 1


@dataclass(frozen=True)
class ConstantFoldPass:
    """Folds constant nodes and static shapes into initializers (see the module docstring)."""

    name: str = "fold_constants"
    max_elements: int = DEFAULT_MAX_ELEMENTS
    max_single_steps: int = 16

    def rule_names(self) -> list[str]:
        return [FOLD_CONSTANT_NODE, FOLD_STATIC_SHAPE]

    def run(self, model: ir.Model, context: PassContext) -> bool:
        """Fold every foldable node; True when something was folded."""
        specs = infer_specs(model, registry=context.registry)
        single = self._count_candidates(model, specs, context) <= self.max_single_steps
        started = time.perf_counter()
        folded: list[ir.Node] = []
        for node in list(model.graph):
            rule, step_started = self.rule_for(node, specs, context), time.perf_counter()
            if rule is None or not self._fold(model, node, rule, specs, context):
                continue
            folded.append(node)
            if single:
                self._report(context, model, rule, node, [node], step_started)
        if folded and not single:
            self._report(context, model, None, None, folded, started)
        return bool(folded)

    def _report(
        self,
        context: PassContext,
        model: ir.Model,
        rule: str | None,
        anchor: ir.Node | None,
        removed: list[ir.Node],
        started: float,
    ) -> None:
        source = function_source(ConstantFoldPass.run)
        name = None if anchor is None else anchor.name
        seconds = time.perf_counter() - started
        event = RewriteEvent(self.name, rule, source, name, removed, [], seconds)
        context.rewrite(event, model)

    def apply_at(self, model: ir.Model, rule_name: str, anchor: str, context: PassContext) -> bool:
        """Fold the node named ``anchor`` by ``rule_name`` (replays a recorded step)."""
        node = next((n for n in model.graph if n.name == anchor), None)
        if node is None:
            return False
        specs = infer_specs(model, registry=context.registry)
        if self.rule_for(node, specs, context) != rule_name:
            return False
        return self._fold(model, node, rule_name, specs, context)

    def rule_for(
        self, node: ir.Node, specs: SpecInference, context: PassContext, check_inputs: bool = True
    ) -> str | None:
        """Which folding applies to ``node`` (None when none does); without ``check_inputs``,
        which would apply were its inputs constant."""
        if node.op_type in RANDOM_OP_TYPES or node.op_type in KEEP_OPS or node_subgraphs(node):
            return None
        if not check_inputs or all(is_constant(v) for v in node.inputs):
            rule = FOLD_CONSTANT_NODE
        elif (
            node.op_type in ("Shape", "Size")
            and normalize_domain(node.domain) == ""
            and node.inputs[0] is not None
            and specs.spec_of(node.outputs[0]).value is not None
        ):
            rule = FOLD_STATIC_SHAPE
        else:
            return None
        return rule if context.rule_enabled(rule) else None

    def _count_candidates(self, model: ir.Model, specs: SpecInference, context: PassContext) -> int:
        """How many nodes would fold (constness propagated without running any kernel)."""
        constant: set[ir.Value] = set()
        for node in model.graph:
            if self.rule_for(node, specs, context) is not None or (
                self.rule_for(node, specs, context, check_inputs=False) is not None
                and all(is_constant(v) or v in constant for v in node.inputs)
            ):
                constant.update(node.outputs)
        return len({id(v.producer()) for v in constant})

    def _fold(
        self,
        model: ir.Model,
        node: ir.Node,
        rule: str,
        specs: SpecInference,
        context: PassContext,
    ) -> bool:
        arrays, reason = None, "its output is a graph output"
        if not any(v.is_graph_output() for v in node.outputs):
            arrays, reason = self._evaluate(model, node, rule, specs, context.registry)
        if reason is not None or arrays is None:
            label = f"{node.name} ({node.op_type})"
            context.why_not(WhyNot(rule, node.name or "", f"{label} not folded: {reason}"))
            return False
        replace_with_initializers(model.graph, node, arrays)
        return True

    def _evaluate(
        self,
        model: ir.Model,
        node: ir.Node,
        rule: str,
        specs: SpecInference,
        registry: OpRegistry,
    ) -> tuple[list[np.ndarray] | None, str | None]:
        """The node's output arrays, or why they are not computed."""
        if rule == FOLD_STATIC_SHAPE:
            return [np.asarray(specs.spec_of(node.outputs[0]).value)], None
        op = registry.lookup(node.op_type, node.domain)
        if op is None:
            return None, registry.unsupported_reason(node)
        inputs: list[Any] = [None if v is None else v.const_value.numpy() for v in node.inputs]
        opset = _opset(model, node)
        in_specs = [
            None if a is None else TensorSpec(TensorSpec.of_array(a).shape, v.dtype, a)
            for a, v in zip(inputs, node.inputs)
        ]
        try:
            out_specs = infer_node(node, in_specs, opset, registry)
        except Exception:  # noqa: BLE001 - the size check is only an early exit
            out_specs = []
        for spec in out_specs:
            if spec.is_static and spec.numel() > self.max_elements:
                return None, f"its output has {spec.numel()} elements (cap {self.max_elements})"
        context = KernelContext(
            opset=opset,
            node_name=node.name or "",
            output_count=len(node.outputs),
            declared_outputs=[declared_spec(v) for v in node.outputs],
        )
        try:
            outputs = list(op.kernel(inputs, Attrs.from_node(node), context))
        except Exception as error:  # noqa: BLE001 - a kernel refusal leaves the node in place
            return None, f"the reference kernel failed ({type(error).__name__}: {error})"
        return _check_outputs(node, outputs, self.max_elements)


def _check_outputs(
    node: ir.Node, outputs: list[Any], max_elements: int
) -> tuple[list[np.ndarray] | None, str | None]:
    if len(outputs) != len(node.outputs):
        return None, "the kernel left an optional output unset"
    arrays = [np.asarray(a) if isinstance(a, np.generic) else a for a in outputs]
    for value, array in zip(node.outputs, arrays):
        if not isinstance(array, np.ndarray) or array.dtype == object:
            return None, f"output '{value.name}' is not a numeric tensor"
        if array.size > max_elements:
            return None, f"its output has {array.size} elements (cap {max_elements})"
        dtype = dtype_of_array(array)
        if dtype is None or (value.dtype is not None and dtype != value.dtype):
            return None, f"the kernel returned {array.dtype} where the graph declares {value.dtype}"
    return arrays, None


def replace_with_initializers(graph: ir.Graph, node: ir.Node, arrays: list[np.ndarray]) -> None:
    """Remove ``node``; each output becomes an initializer of the same name holding its array."""
    replacements = []
    for value, array in zip(node.outputs, arrays):
        array = array if array.flags.c_contiguous else np.array(array, order="C")
        tensor = ir.tensor(array, name=value.name)
        constant = ir.Value(type=ir.TensorType(tensor.dtype), shape=tensor.shape)
        constant.const_value = tensor
        value.replace_all_uses_with(constant)
        replacements.append((value.name, constant))
    graph.remove(node, safe=True)
    for name, constant in replacements:
        constant.name = name
        graph.register_initializer(constant)


CONSTANT_FOLDING = ConstantFoldPass()

FOLD_PASSES: list[GraphPass] = [
    CONSTANT_FOLDING,
    SHAPE_FOLDING,
    DEAD_CODE_ELIMINATION,
    DEDUPLICATE_INITIALIZERS,
]
