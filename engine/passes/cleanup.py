"""O1 cleanup: remove nodes that compute nothing, dead code, duplicates and redundant Casts.

Rule-based (one recorded step per application, see :class:`RewritePass`):

* ``cleanup``: ``remove_identity``, ``remove_dropout`` (inference Dropout), the no-op arithmetic
  ``remove_mul_by_one``, ``remove_add_zero``, ``remove_sub_zero``, ``remove_div_by_one`` (only
  when the constant cannot broadcast the other operand to a bigger shape), and the provable
  no-op data movements ``remove_noop_transpose``, ``remove_noop_expand``,
  ``remove_noop_reshape``;
* ``cast_cleanup``: ``remove_noop_cast`` (Cast to the type it already has) and
  ``merge_cast_chain`` (Cast(Cast(x, T1), T2) -> Cast(x, T2) when T1 holds every value of x's
  type exactly, so the second Cast sees the same number).

Whole-graph (one step per run, see :class:`FunctionPass`): ``dead_code_elimination`` (nodes whose
outputs nobody reads and unused initializers), ``deduplicate_initializers`` (same dtype, shape
and bytes) and ``common_subexpression_elimination`` (same op, attributes and inputs).

A removal forwards the node's input to its readers; the rewriter gives the forwarded value the
removed output's name, so graph outputs keep their names. Removal is refused when that would
rename a graph input or merge two graph outputs (the reason says which).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    DeduplicateHashedInitializersPass,
    RemoveUnusedNodesPass,
)
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase

from engine.passes.events import PassContext
from engine.passes.function_pass import FunctionPass
from engine.passes.manager import GraphPass
from engine.passes.rewrite import NOT_A_NEAR_MATCH, RewritePass

_D = ir.DataType
_INTS = {
    _D.INT8: (True, 8),
    _D.INT16: (True, 16),
    _D.INT32: (True, 32),
    _D.INT64: (True, 64),
    _D.UINT8: (False, 8),
    _D.UINT16: (False, 16),
    _D.UINT32: (False, 32),
    _D.UINT64: (False, 64),
}
#: Float type -> (significand bits incl. the implicit one, max exponent); used to decide
#: whether every value of one type is exactly representable in another.
_FLOATS = {_D.FLOAT16: (11, 15), _D.BFLOAT16: (8, 127), _D.FLOAT: (24, 127), _D.DOUBLE: (53, 1023)}


def holds_exactly(source: ir.DataType, target: ir.DataType) -> bool:
    """True when every value of ``source`` is exactly representable in ``target``."""
    if source == target or (source == _D.BOOL and (target in _INTS or target in _FLOATS)):
        return True
    if source in _INTS and target in _INTS:
        (signed_s, bits_s), (signed_t, bits_t) = _INTS[source], _INTS[target]
        if signed_s and not signed_t:
            return False
        return bits_t > bits_s or (bits_t == bits_s and signed_s == signed_t)
    if source in _INTS and target in _FLOATS:
        signed, bits = _INTS[source]
        return bits - (1 if signed else 0) <= _FLOATS[target][0]
    if source in _FLOATS and target in _FLOATS:
        (mant_s, exp_s), (mant_t, exp_t) = _FLOATS[source], _FLOATS[target]
        return mant_t >= mant_s and exp_t >= exp_s
    return False


def forwarding_refusal(node: str, forwarded: ir.Value, replaced: ir.Value) -> str | None:
    """Why readers of ``replaced`` cannot read ``forwarded`` instead (None when they can)."""
    if forwarded.is_graph_input():
        return (
            f"{node} kept: its input '{forwarded.name}' is a graph input, and removing the "
            "node would rename it"
        )
    if replaced.is_graph_output() and (forwarded.is_graph_output() or forwarded.is_initializer()):
        kind = "graph output" if forwarded.is_graph_output() else "initializer"
        return (
            f"{node} kept: it produces graph output '{replaced.name}' from the {kind} "
            f"'{forwarded.name}', which cannot take that name too"
        )
    return None


#: Reason a check gives when the node is not even a near match; never reported as a WhyNot.
def _node_name(context: object) -> str:
    root = getattr(context, "root", None)
    return (root.name or root.op_type) if root is not None else "node"


def _dims(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (d.value or None) for d in value.shape]


class RemoveIdentity(RewriteRuleClassBase):
    """Identity(x) -> x."""

    def __init__(self) -> None:
        super().__init__("remove_identity")

    def pattern(self, op, x):
        return op.Identity(x)

    def check(self, context, x: ir.Value) -> MatchResult:
        reason = forwarding_refusal(_node_name(context), x, context.output_values[0])
        return MatchResult().fail(reason) if reason else MatchResult()

    def rewrite(self, op, x: ir.Value) -> ir.Value:
        return x


class RemoveDropout(RewriteRuleClassBase):
    """Dropout(x) -> x at inference (training_mode absent or a constant false; a Dropout whose
    mask is read does not match)."""

    def __init__(self) -> None:
        super().__init__("remove_dropout")

    def pattern(self, op, x):
        return op.Dropout(x, _allow_other_inputs=True, _allow_other_attributes=True)

    def check(self, context, x: ir.Value) -> MatchResult:
        node = context.root
        name = _node_name(context)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            mode = node.inputs[2].const_value
            if mode is None or bool(mode.numpy().any()):
                return MatchResult().fail(
                    f"{name} kept: training_mode is not a constant false, so it may drop values"
                )
        reason = forwarding_refusal(name, x, node.outputs[0])
        return MatchResult().fail(reason) if reason else MatchResult()

    def rewrite(self, op, x: ir.Value) -> ir.Value:
        return x


class RemoveNeutralOperand(RewriteRuleClassBase):
    """``x op c`` -> x when c is the operation's neutral element and does not broadcast x."""

    def __init__(self, name: str, op_type: str, neutral: float, commutes: bool) -> None:
        super().__init__(name)
        self.op_type, self.neutral, self.commutes = op_type, neutral, commutes

    def pattern(self, op, a, b):
        return getattr(op, self.op_type)(a, b)

    def _operand(self, x: ir.Value, c: ir.Value) -> str | None:
        """None when ``x op c`` is x; otherwise why not."""
        tensor = c.const_value
        if tensor is None:
            return f"'{c.name}' is not a constant"
        if not np.all(tensor.numpy() == self.neutral):
            return f"'{c.name}' is not neutral"
        dims, c_dims = _dims(x), list(tensor.shape)
        if dims is None:
            return f"the rank of '{x.name}' is unknown, so {self.op_type} may broadcast it"
        if len(c_dims) > len(dims) or any(
            cd != 1 and cd != xd for cd, xd in zip(reversed(c_dims), reversed(dims))
        ):
            return f"'{c.name}' {c_dims} broadcasts '{x.name}' {dims} to a bigger shape"
        if x.dtype is not None and tensor.dtype != x.dtype:
            return f"'{c.name}' has another dtype than '{x.name}'"
        return None

    def check(self, context, a: ir.Value, b: ir.Value) -> MatchResult:
        name = _node_name(context)
        candidates = [(a, b), (b, a)] if self.commutes else [(a, b)]
        reasons = []
        for x, c in candidates:
            why = self._operand(x, c)
            if why is None:
                refusal = forwarding_refusal(name, x, context.output_values[0])
                if refusal is None:
                    self._keep = x
                    return MatchResult()
                why = refusal
            reasons.append(why)
        reasons = [r for r in reasons if not r.endswith(("is not a constant", "is not neutral"))]
        if not reasons:
            return MatchResult().fail(NOT_A_NEAR_MATCH)
        return MatchResult().fail(f"{name} ({self.op_type}) kept: {'; '.join(reasons)}")

    def rewrite(self, op, a: ir.Value, b: ir.Value) -> ir.Value:
        return self._keep


class _NoOpRule(RewriteRuleClassBase):
    """Base of single-input no-op removals: subclasses say why the node is not a no-op."""

    def not_noop(self, node: ir.Node, x: ir.Value) -> str | None:
        raise NotImplementedError

    def check(self, context, x: ir.Value, **_: object) -> MatchResult:
        name = _node_name(context)
        why = self.not_noop(context.root, x)
        if why is None:
            why = forwarding_refusal(name, x, context.output_values[0])
            return MatchResult().fail(why) if why else MatchResult()
        if not why:
            return MatchResult().fail(NOT_A_NEAR_MATCH)
        return MatchResult().fail(f"{name} ({context.root.op_type}) kept: {why}")

    def rewrite(self, op, x: ir.Value, **_: object) -> ir.Value:
        return x


class RemoveNoOpTranspose(_NoOpRule):
    """Transpose with the identity permutation (or of a rank <= 1 tensor) -> x."""

    def __init__(self) -> None:
        super().__init__("remove_noop_transpose")

    def pattern(self, op, x):
        return op.Transpose(x, _allow_other_attributes=True)

    def not_noop(self, node: ir.Node, x: ir.Value) -> str | None:
        perm = node.attributes.get_ints("perm")
        if perm is not None:
            return None if list(perm) == list(range(len(perm))) else ""
        dims = _dims(x)
        return None if dims is not None and len(dims) <= 1 else ""


class RemoveNoOpExpand(_NoOpRule):
    """Expand(x, shape) -> x when broadcasting x to the constant shape leaves it unchanged."""

    def __init__(self) -> None:
        super().__init__("remove_noop_expand")

    def pattern(self, op, x, shape):
        return op.Expand(x, shape)

    def not_noop(self, node: ir.Node, x: ir.Value) -> str | None:
        shape = node.inputs[1]
        if shape is None or shape.const_value is None:
            return ""
        target, dims = shape.const_value.numpy().tolist(), _dims(x)
        if dims is None:
            return f"the shape of '{x.name}' is unknown"
        if len(target) > len(dims) or any(
            t != 1 and t != d for t, d in zip(reversed(target), reversed(dims))
        ):
            return f"expanding {dims} to {target} changes the shape"
        return None


class RemoveNoOpReshape(_NoOpRule):
    """Reshape(x, shape) -> x when the constant shape provably equals x's shape."""

    def __init__(self) -> None:
        super().__init__("remove_noop_reshape")

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True)

    def not_noop(self, node: ir.Node, x: ir.Value) -> str | None:
        shape = node.inputs[1]
        if shape is None or shape.const_value is None:
            return ""
        target, dims = shape.const_value.numpy().tolist(), _dims(x)
        allowzero = node.attributes.get_int("allowzero", 0)
        if dims is None or len(target) != len(dims):
            return ""
        open_dims = [
            i
            for i, (t, d) in enumerate(zip(target, dims))
            if not (t == d and isinstance(d, int)) and not (t == 0 and not allowzero)
        ]
        if not open_dims or (len(open_dims) == 1 and target[open_dims[0]] == -1):
            return None
        return f"target {target} is not provably the input shape {dims}"


class RemoveNoOpCast(_NoOpRule):
    """Cast(x, to=T) -> x when x already has type T."""

    def __init__(self) -> None:
        super().__init__("remove_noop_cast")

    def pattern(self, op, x):
        return op.Cast(x, _allow_other_attributes=True)

    def not_noop(self, node: ir.Node, x: ir.Value) -> str | None:
        return None if x.dtype is not None and x.dtype == node.attributes.get_int("to") else ""


class MergeCastChain(RewriteRuleClassBase):
    """Cast(Cast(x, to=T1), to=T2) -> Cast(x, to=T2) when T1 holds every value of x exactly."""

    def __init__(self) -> None:
        super().__init__("merge_cast_chain")

    def pattern(self, op, x):
        return op.Cast(op.Cast(x, _allow_other_attributes=True), _allow_other_attributes=True)

    def check(self, context, x: ir.Value) -> MatchResult:
        second = context.root
        first = next(n for n in context.nodes if n is not second)
        middle = _D(first.attributes.get_int("to"))
        self._to = second.attributes.get_int("to")
        if x.dtype is None:
            return MatchResult().fail(f"Cast chain at {second.name} kept: the type of x is unknown")
        if not holds_exactly(x.dtype, middle):
            return MatchResult().fail(
                f"Cast chain at {second.name} kept: {x.dtype.name} -> {middle.name} loses "
                "values, so the first Cast is not redundant"
            )
        return MatchResult()

    def rewrite(self, op, x: ir.Value) -> ir.Value:
        return op.Cast(x, to=self._to)


def _run_ir_pass(ir_pass: ir.passes.InPlacePass, model: ir.Model) -> bool:
    return bool(ir_pass(model).modified)


def eliminate_dead_code(model: ir.Model, context: PassContext) -> bool:
    """Remove nodes whose outputs nobody reads (and that are not graph outputs), and unused
    initializers."""
    return _run_ir_pass(RemoveUnusedNodesPass(), model)


def deduplicate_initializers(model: ir.Model, context: PassContext) -> bool:
    """Make readers of initializers with equal dtype, shape and bytes share one of them."""
    return _run_ir_pass(DeduplicateHashedInitializersPass(), model)


def eliminate_common_subexpressions(model: ir.Model, context: PassContext) -> bool:
    """Merge nodes with the same op, attributes and inputs (random ops excepted)."""
    return _run_ir_pass(CommonSubexpressionEliminationPass(), model)


NEUTRAL_RULES = (
    RemoveNeutralOperand.rule("remove_mul_by_one", "Mul", 1.0, True),
    RemoveNeutralOperand.rule("remove_add_zero", "Add", 0.0, True),
    RemoveNeutralOperand.rule("remove_sub_zero", "Sub", 0.0, False),
    RemoveNeutralOperand.rule("remove_div_by_one", "Div", 1.0, False),
)
CLEANUP_RULES = RewritePass(
    "cleanup",
    (
        RemoveIdentity.rule(),
        RemoveDropout.rule(),
        *NEUTRAL_RULES,
        RemoveNoOpTranspose.rule(),
        RemoveNoOpExpand.rule(),
        RemoveNoOpReshape.rule(),
    ),
)
CAST_CLEANUP = RewritePass("cast_cleanup", (RemoveNoOpCast.rule(), MergeCastChain.rule()))
DEAD_CODE_ELIMINATION = FunctionPass("dead_code_elimination", eliminate_dead_code)
DEDUPLICATE_INITIALIZERS = FunctionPass("deduplicate_initializers", deduplicate_initializers)
COMMON_SUBEXPRESSION_ELIMINATION = FunctionPass(
    "common_subexpression_elimination", eliminate_common_subexpressions
)

CLEANUP_PASSES: list[GraphPass] = [
    CLEANUP_RULES,
    CAST_CLEANUP,
    DEAD_CODE_ELIMINATION,
    DEDUPLICATE_INITIALIZERS,
    COMMON_SUBEXPRESSION_ELIMINATION,
]
