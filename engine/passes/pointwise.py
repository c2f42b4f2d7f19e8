"""Pointwise fusion: maximal trees of elementwise float ops become one gie::Pointwise.

Runs after the epilogue and transformer fusions, so whatever elementwise op is still in the
graph is fair game. A tree grows from a root (visited last to first, so trees are maximal)
through producers that are elementwise float ops whose output has exactly one consumer node
and is not a graph output. Scalar constants become literals of the expression; every other
operand becomes an input ``x<i>`` of the fused node. An existing gie::Pointwise is spliced in
like any other member (rule ``extend_pointwise``), and a float-to-float Cast may end a tree
(it sets the ``output_dtype`` attribute). Each fused tree is one recorded step whose anchor
is the root, so :meth:`PointwiseFusionPass.apply_at` can replay it. Producers that nearly
joined a tree get a "why not" reason naming them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir import convenience

from engine.ops.gie_pointwise import (
    Call,
    Expr,
    Input,
    Literal,
    format_expression,
    parse_expression,
    substitute,
)
from engine.ops.registry import GIE_DOMAIN
from engine.passes.events import PassContext, RewriteEvent, WhyNot
from engine.passes.function_pass import function_source
from engine.passes.provenance import inherit_provenance

FUSE_RULE = "fuse_pointwise_chain"
EXTEND_RULE = "extend_pointwise"

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
)

#: Elementwise ONNX ops (default domain) -> the expression function that computes them.
SIMPLE_FUNCTIONS = {
    "Add": "add",
    "Sub": "sub",
    "Mul": "mul",
    "Div": "div",
    "Pow": "pow",
    "Max": "max",
    "Min": "min",
    "Neg": "neg",
    "Abs": "abs",
    "Sqrt": "sqrt",
    "Exp": "exp",
    "Log": "log",
    "Erf": "erf",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "Relu": "relu",
    "Reciprocal": "reciprocal",
    "Softplus": "softplus",
    "HardSwish": "hard_swish",
}
#: ONNX op types (default domain) that a Pointwise expression can hold.
FUSABLE_OPS = frozenset({*SIMPLE_FUNCTIONS, "LeakyRelu", "HardSigmoid", "Clip"})
_MAX_TREE_NODES = 512


def _is_pointwise(node: ir.Node) -> bool:
    return node.domain == GIE_DOMAIN and node.op_type == "Pointwise"


def _is_candidate_type(node: ir.Node) -> bool:
    return (node.domain in ("", "ai.onnx") and node.op_type in FUSABLE_OPS) or _is_pointwise(node)


def _scalar_literal(value: ir.Value, node: ir.Node) -> float | None:
    """The float of a size-1 constant input of ``node`` that cannot change its output shape.

    A size-1 constant only adds leading dims through broadcasting, so it may become a literal
    when it is a scalar or no deeper than a non-constant input of the same node.
    """
    graph = node.graph
    if value.const_value is None or (graph is not None and value in graph.inputs):
        return None
    array = value.const_value.numpy()
    if array.size != 1 or array.dtype.kind not in "fiu":
        return None
    if array.ndim:
        ranks = [
            _rank(v)
            for v in node.inputs
            if v is not None and v is not value and v.const_value is None
        ]
        if not ranks or any(r is None for r in ranks) or array.ndim > max(ranks):  # type: ignore[type-var]
            return None
    return float(np.asarray(array, dtype=np.float64).reshape(-1)[0])


def _attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def _float_output(node: ir.Node) -> str | None:
    """None when the node computes on floats, else why not (for the reason text)."""
    dtype = node.outputs[0].dtype
    if dtype is None:
        return "its output dtype is unknown"
    if dtype not in FLOAT_TYPES:
        return f"its output is {dtype.name}, not a float type"
    return None


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


@dataclass
class _Tree:
    """A fusable tree: its root, its members, and the reasons producers were left out."""

    root: ir.Node
    members: list[ir.Node]
    refusals: list[WhyNot]


class PointwiseFusionPass:
    """Fuses maximal trees of elementwise float ops into gie::Pointwise nodes."""

    def __init__(self, name: str = "pointwise_fusion") -> None:
        self.name = name

    def rule_names(self) -> list[str]:
        return [FUSE_RULE, EXTEND_RULE]

    def run(self, model: ir.Model, context: PassContext) -> bool:
        """Fuse every tree of two or more ops; True when the graph changed."""
        taken: set[int] = set()
        trees: list[_Tree] = []
        for node in reversed(list(model.graph)):
            if id(node) in taken or not self._root_ok(node):
                continue
            tree = self._grow(model, node)
            for member in tree.members:
                taken.add(id(member))
            for why in tree.refusals:
                context.why_not(why)
            if len(tree.members) >= 2 and context.rule_enabled(self._rule_of(tree)):
                trees.append(tree)
        fused = [self._fuse(model, tree, context) for tree in trees]
        return any(fused)

    def apply_at(self, model: ir.Model, rule_name: str, anchor: str, context: PassContext) -> bool:
        """Fuse the tree rooted at the node named ``anchor`` (replay of a recorded step)."""
        root = next((n for n in model.graph if n.name == anchor), None)
        if root is None or rule_name not in self.rule_names() or not self._root_ok(root):
            return False
        tree = self._grow(model, root)
        if len(tree.members) < 2 or self._rule_of(tree) != rule_name:
            return False
        return self._fuse(model, tree, context)

    # ------------------------------------------------------------------ tree discovery

    @staticmethod
    def _rule_of(tree: _Tree) -> str:
        return EXTEND_RULE if any(_is_pointwise(m) for m in tree.members) else FUSE_RULE

    @staticmethod
    def _root_ok(node: ir.Node) -> bool:
        if len(node.outputs) != 1 or _float_output(node) is not None:
            return False
        if node.domain in ("", "ai.onnx") and node.op_type == "Cast":
            source = node.inputs[0]
            return source is not None and source.dtype in FLOAT_TYPES
        return _is_candidate_type(node) and _inputs_float(node)

    def _grow(self, model: ir.Model, root: ir.Node) -> _Tree:
        """Members: the root, then (to a fixed point) every fusable producer whose consumers
        are all members; then the reasons of the adjacent producers left out."""
        outputs = set(model.graph.outputs)
        members = [root]
        member_ids = {id(root)}
        grew = True
        while grew:
            grew = False
            for _, value, producer in self._frontier(members, member_ids):
                if id(producer) in member_ids:
                    continue
                consumers = {id(use.node) for use in value.uses()}
                if self._basic_refusal(producer, value, outputs) or not consumers <= member_ids:
                    continue
                members.append(producer)
                member_ids.add(id(producer))
                grew = True
        refusals: dict[str, WhyNot] = {}
        for _, value, producer in self._frontier(members, member_ids):
            reason = self._basic_refusal(producer, value, outputs)
            if reason is None:
                count = len({id(use.node) for use in value.uses()})
                reason = f"its output feeds {count} consumers"
            text = f"{producer.name} not fused into Pointwise: {reason}"
            refusals[producer.name or ""] = WhyNot(FUSE_RULE, producer.name or "", text)
        return _Tree(root, members, list(refusals.values()))

    @staticmethod
    def _frontier(
        members: list[ir.Node], member_ids: set[int]
    ) -> list[tuple[ir.Node, ir.Value, ir.Node]]:
        """(member, input value, producer) for fusable producers outside the members."""
        found = []
        for node in members:
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if producer is None or id(producer) in member_ids:
                    continue
                if not _is_candidate_type(producer) or _scalar_literal(value, node) is not None:
                    continue
                found.append((node, value, producer))
        return found

    @staticmethod
    def _basic_refusal(producer: ir.Node, value: ir.Value, outputs: set[ir.Value]) -> str | None:
        float_reason = _float_output(producer)
        if float_reason is not None:
            return float_reason
        if not _inputs_float(producer):
            return "one of its inputs is not a float tensor"
        if value in outputs:
            return "its output is a graph output"
        return None

    # ------------------------------------------------------------------ rewriting

    def _fuse(self, model: ir.Model, tree: _Tree, context: PassContext) -> bool:
        """Replace the tree by one gie::Pointwise and report the step; False when refused."""
        started = time.perf_counter()
        graph = model.graph
        operands: list[ir.Value] = []
        expression = _Builder(graph, set(map(id, tree.members)), operands).build(tree.root)
        problem = "the expression is too large" if _size(expression) > _MAX_TREE_NODES else ""
        if not operands:
            problem = "every operand is a constant (constant folding's job)"
        if problem:
            reason = f"{tree.root.name} not fused into Pointwise: {problem}"
            context.why_not(WhyNot(self._rule_of(tree), tree.root.name or "", reason))
            return False
        root_out = tree.root.outputs[0]
        attributes: list[ir.Attr] = [ir.AttrString("expression", format_expression(expression))]
        if root_out.dtype is not None and (not operands or operands[0].dtype != root_out.dtype):
            attributes.append(ir.AttrInt64("output_dtype", int(root_out.dtype)))
        fused = ir.Node(
            GIE_DOMAIN,
            "Pointwise",
            operands,
            attributes=attributes,
            num_outputs=1,
            name=_unique_name(graph, f"{tree.root.name}/Pointwise"),
        )
        fused.outputs[0].dtype = root_out.dtype
        fused.outputs[0].shape = root_out.shape
        rule = self._rule_of(tree)
        ordered = [n for n in graph if id(n) in set(map(id, tree.members))]
        inherit_provenance([fused], ordered, rule)
        anchor = tree.root.name
        convenience.replace_nodes_and_values(
            graph, tree.root, ordered, [fused], [root_out], [fused.outputs[0]]
        )
        if GIE_DOMAIN not in model.opset_imports:
            model.opset_imports[GIE_DOMAIN] = 1
        event = RewriteEvent(
            pass_name=self.name,
            rule=rule,
            rule_source=function_source(PointwiseFusionPass._fuse),
            anchor=anchor,
            removed=ordered,
            added=[fused],
            seconds=time.perf_counter() - started,
        )
        context.rewrite(event, model)
        return True


def _inputs_float(node: ir.Node) -> bool:
    """Every data input that will not become a literal is a float tensor."""
    for index, value in enumerate(node.inputs):
        if value is None:
            continue
        if _scalar_literal(value, node) is not None:
            continue
        if node.op_type == "Clip" and index > 0:
            if value.dtype in FLOAT_TYPES:
                continue
            return False
        if value.dtype not in FLOAT_TYPES:
            return False
    return True


class _Builder:
    """Turns the members of a tree into an expression; other operands become inputs."""

    def __init__(self, graph: ir.Graph, members: set[int], operands: list[ir.Value]) -> None:
        self.graph = graph
        self.members = members
        self.operands = operands

    def build(self, node: ir.Node) -> Expr:
        args = [self._operand(v, node) for v in node.inputs]
        if _is_pointwise(node):
            text = node.attributes["expression"].value
            return substitute(parse_expression(str(text)), [a for a in args if a is not None])
        return _OP_BUILDERS.get(node.op_type, _simple)(node, args)

    def _operand(self, value: ir.Value | None, node: ir.Node) -> Expr | None:
        if value is None:
            return None
        producer = value.producer()
        if producer is not None and id(producer) in self.members:
            return self.build(producer)
        literal = _scalar_literal(value, node)
        if literal is not None:
            return Literal(literal)
        for index, known in enumerate(self.operands):
            if known is value:
                return Input(index)
        self.operands.append(value)
        return Input(len(self.operands) - 1)


def _simple(node: ir.Node, args: list[Expr | None]) -> Expr:
    return Call(SIMPLE_FUNCTIONS[node.op_type], tuple(a for a in args if a is not None))


def _leaky_relu(node: ir.Node, args: list[Expr | None]) -> Expr:
    alpha = _attr_float(node, "alpha", 0.01)
    return Call("leaky_relu", (args[0], Literal(alpha)))  # type: ignore[arg-type]


def _hard_sigmoid(node: ir.Node, args: list[Expr | None]) -> Expr:
    alpha = _attr_float(node, "alpha", 0.2)
    beta = _attr_float(node, "beta", 0.5)
    return Call("hard_sigmoid", (args[0], Literal(alpha), Literal(beta)))  # type: ignore[arg-type]


def _clip(node: ir.Node, args: list[Expr | None]) -> Expr:
    low: Expr = Literal(_attr_float(node, "min", float("-inf")))
    high: Expr = Literal(_attr_float(node, "max", float("inf")))
    if len(args) > 1 and args[1] is not None:
        low = args[1]
    if len(args) > 2 and args[2] is not None:
        high = args[2]
    return Call("clip", (args[0], low, high))  # type: ignore[arg-type]


def _cast(node: ir.Node, args: list[Expr | None]) -> Expr:
    return args[0]  # type: ignore[return-value]  # the dtype goes to 'output_dtype'


_OP_BUILDERS: dict[str, Callable[[ir.Node, list[Expr | None]], Expr]] = {
    "LeakyRelu": _leaky_relu,
    "HardSigmoid": _hard_sigmoid,
    "Clip": _clip,
    "Cast": _cast,
}


def _size(tree: Expr) -> int:
    if isinstance(tree, Call):
        return 1 + sum(_size(a) for a in tree.args)
    return 1


def _unique_name(graph: ir.Graph, base: str) -> str:
    taken = {n.name for n in graph}
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    return name


POINTWISE_PASSES = [PointwiseFusionPass()]
