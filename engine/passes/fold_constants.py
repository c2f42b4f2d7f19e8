"""O1 constant folding, with the engine's own reference kernels, and shape-chain folding.

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

``fold_shapes`` (a :class:`NearMissRewritePass`) handles what stays symbolic:

* ``fold_reshape_shape_chain``: Reshape(x, Concat(...)) whose target is built from constants and
  dims of tensors (Shape -> Gather/Slice -> Unsqueeze -> Concat, as exporters emit). A target dim
  that is x's own dim at the same position becomes 0 (Reshape's copy-dim, only with
  allowzero=0), one remaining unknown dim becomes -1; the Reshape then reads a constant and the
  chain dies in dead-code elimination, so the graph stays valid for any batch or sequence.
* ``fold_expand_shape_chain``: the same for Expand targets, where x's own dim becomes 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase

from engine.ops.registry import (
    RANDOM_OP_TYPES,
    Attrs,
    KernelContext,
    OpRegistry,
    TensorSpec,
    dtype_of_array,
    normalize_domain,
)
from engine.ops.shape_inference import SpecInference, declared_spec, infer_node, infer_specs
from engine.passes.cleanup import (
    DEAD_CODE_ELIMINATION,
    DEDUPLICATE_INITIALIZERS,
    NOT_A_NEAR_MATCH,
    NearMissRewritePass,
)
from engine.passes.events import PassContext, RewriteEvent, WhyNot
from engine.passes.function_pass import function_source
from engine.passes.manager import GraphPass

FOLD_CONSTANT_NODE = "fold_constant_node"
FOLD_STATIC_SHAPE = "fold_static_shape"
#: Ops never folded: quantization boundaries stay so quantized weights keep their int form;
#: Dropout draws a random mask in training mode.
KEEP_OPS = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "Dropout"})
DEFAULT_MAX_ELEMENTS = 2**26


def is_constant(value: ir.Value | None) -> bool:
    """An omitted input, or an initializer that is not also a graph input."""
    return value is None or (value.const_value is not None and not value.is_graph_input())


def _has_subgraph(node: ir.Node) -> bool:
    return any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for attr in node.attributes.values()
    )


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
        if node.op_type in RANDOM_OP_TYPES or node.op_type in KEEP_OPS or _has_subgraph(node):
            return None
        if not check_inputs or all(is_constant(v) for v in node.inputs):
            rule = FOLD_CONSTANT_NODE
        elif (
            node.op_type in ("Shape", "Size")
            and normalize_domain(node.domain) == ""
            and node.inputs[0] is not None
            and _spec(specs, node.outputs[0]).value is not None
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
            return [np.asarray(_spec(specs, node.outputs[0]).value)], None
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


def _spec(specs: SpecInference, value: ir.Value) -> TensorSpec:
    return specs.specs.get(value) or declared_spec(value)


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


@dataclass(frozen=True)
class DimOf:
    """Dim ``axis`` of ``value``: what ``Shape(value)[axis]`` holds at run time."""

    value: ir.Value
    axis: int


Element = int | DimOf
_PASS_THROUGH = frozenset({"Unsqueeze", "Squeeze", "Identity", "Cast"})


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or not is_constant(value):
        return None
    array = value.const_value.numpy()
    return [int(v) for v in array.reshape(-1)] if array.dtype.kind in "iu" else None


def shape_elements(value: ir.Value, specs: SpecInference, depth: int = 0) -> list[Element] | None:
    """The elements of a 1-D (or scalar) int tensor as constants and tensor dims, or None.

    Follows Shape, Gather and Slice (constant indices), Unsqueeze, Squeeze, Identity, Cast and
    Concat back to constants and ``Shape(x)`` dims.
    """
    constant = _ints(value)
    if constant is not None:
        return list(constant)
    spec = _spec(specs, value)
    if spec.value is not None and np.asarray(spec.value).dtype.kind in "iu":
        return [int(v) for v in np.asarray(spec.value).reshape(-1)]
    node = value.producer()
    if node is None or depth > 32 or normalize_domain(node.domain) != "":
        return None
    op = node.op_type
    if op == "Shape":
        source = node.inputs[0]
        dims = _spec(specs, source).shape if source is not None else None
        if dims is None or source is None:
            return None
        elements: list[Element] = [
            d if isinstance(d, int) else DimOf(source, i) for i, d in enumerate(dims)
        ]
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(dims))
        return elements[slice(start, end)]
    if op in _PASS_THROUGH and node.inputs[0] is not None:
        return shape_elements(node.inputs[0], specs, depth + 1)
    if op == "Concat":
        parts = [None if v is None else shape_elements(v, specs, depth + 1) for v in node.inputs]
        if any(p is None for p in parts):
            return None
        return [e for part in parts if part is not None for e in part]
    data = shape_elements(node.inputs[0], specs, depth + 1) if node.inputs[0] is not None else None
    if data is None:
        return None
    if op == "Gather" and node.attributes.get_int("axis", 0) == 0:
        indices = _ints(node.inputs[1])
        if indices is None or any(not -len(data) <= i < len(data) for i in indices):
            return None
        return [data[i] for i in indices]
    if op == "Slice":
        starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
        axes = _ints(node.inputs[3]) if len(node.inputs) > 3 else [0]
        steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else [1]
        if not starts or not ends or axes not in ([0], [-1]) or not steps or steps[0] < 1:
            return None
        return data[slice(starts[0], ends[0], steps[0])]
    return None


def _symbol(value: ir.Value, axis: int) -> str | None:
    if value.shape is None or not 0 <= axis < len(value.shape):
        return None
    dim = value.shape[axis]
    return None if isinstance(dim, int) else dim.value


def same_dim(element: DimOf, x: ir.Value, axis: int) -> bool:
    """True when ``element`` is provably dim ``axis`` of ``x`` (the same tensor's dim, or the
    same named symbolic dim)."""
    if element.value is x:
        return element.axis == axis
    symbol = _symbol(element.value, element.axis)
    return symbol is not None and symbol == _symbol(x, axis)


def _describe(element: Element) -> str:
    if isinstance(element, int):
        return str(element)
    return f"dim {element.axis} of '{element.value.name}'"


class _ShapeChainRule(RewriteRuleClassBase):
    """Shared part of the shape-chain folds: cached spec inference, element analysis."""

    op_type = ""

    def setup(self) -> None:
        self._cache: tuple[int, SpecInference] | None = None

    def specs(self, model: ir.Model) -> SpecInference:
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != id(model):
            cache = (id(model), infer_specs(model))
            self._cache = cache
        return cache[1]

    def elements(self, context: Any, shape: ir.Value) -> list[Element] | MatchResult:
        if is_constant(shape):
            return MatchResult().fail(NOT_A_NEAR_MATCH)
        elements = shape_elements(shape, self.specs(context.model))
        if elements is None:
            return MatchResult().fail(
                f"{context.root.name} ({self.op_type}) target '{shape.name}' not folded: it is "
                "not computed from constants and tensor dims (Shape, Gather, Slice, Unsqueeze, "
                "Concat)"
            )
        return elements

    def rewrite(self, op, x: ir.Value, shape: ir.Value):
        folded = op.initializer(ir.tensor(np.array(self._target, np.int64), name=self._name))
        return getattr(op, self.op_type)(x, folded, **self._attributes)


class FoldReshapeShapeChain(_ShapeChainRule):
    """Reshape(x, shape chain) -> Reshape(x, constant) with 0 for x's own dims, -1 for one other."""

    op_type = "Reshape"

    def __init__(self) -> None:
        super().__init__("fold_reshape_shape_chain")

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True)

    def check(self, context, x: ir.Value, shape: ir.Value) -> MatchResult:
        elements = self.elements(context, shape)
        if isinstance(elements, MatchResult):
            return elements
        allowzero = context.root.attributes.get_int("allowzero", 0)
        target: list[int] = []
        unknown: list[int] = []
        for axis, element in enumerate(elements):
            if isinstance(element, int):
                target.append(element)
            elif not allowzero and same_dim(element, x, axis):
                target.append(0)
            else:
                unknown.append(axis)
                target.append(-1)
        if len(unknown) > 1 or (unknown and target.count(-1) > 1):
            open_dims = ", ".join(f"{i}: {_describe(elements[i])}" for i in unknown)
            return MatchResult().fail(
                f"{context.root.name} (Reshape) target not folded: dims {open_dims} are not "
                f"provably dims of '{x.name}' at the same position, and only one dim can be -1"
            )
        self._target, self._name = target, f"{shape.name}/folded"
        self._attributes = {"allowzero": allowzero} if allowzero else {}
        return MatchResult()


class FoldExpandShapeChain(_ShapeChainRule):
    """Expand(x, shape chain) -> Expand(x, constant) with 1 where the target is x's own dim."""

    op_type = "Expand"

    def __init__(self) -> None:
        super().__init__("fold_expand_shape_chain")

    def pattern(self, op, x, shape):
        return op.Expand(x, shape)

    def check(self, context, x: ir.Value, shape: ir.Value) -> MatchResult:
        elements = self.elements(context, shape)
        if isinstance(elements, MatchResult):
            return elements
        rank = len(x.shape) if x.shape is not None else None
        target: list[int] = []
        for axis, element in enumerate(elements):
            aligned = None if rank is None else axis - (len(elements) - rank)
            if isinstance(element, int):
                target.append(element)
            elif aligned is not None and aligned >= 0 and same_dim(element, x, aligned):
                target.append(1)
            else:
                return MatchResult().fail(
                    f"{context.root.name} (Expand) target not folded: dim {axis} "
                    f"({_describe(element)}) is not provably the matching dim of '{x.name}'"
                )
        self._target, self._name, self._attributes = target, f"{shape.name}/folded", {}
        return MatchResult()


CONSTANT_FOLDING = ConstantFoldPass()
SHAPE_FOLDING = NearMissRewritePass(
    "fold_shapes", (FoldReshapeShapeChain.rule(), FoldExpandShapeChain.rule())
)

FOLD_PASSES: list[GraphPass] = [
    CONSTANT_FOLDING,
    SHAPE_FOLDING,
    DEAD_CODE_ELIMINATION,
    DEDUPLICATE_INITIALIZERS,
]
