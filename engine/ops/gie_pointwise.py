"""gie::Pointwise: a fused chain of elementwise float ops held as an expression.

The node has inputs ``x0 .. xN`` (NumPy broadcasting between them) and one output. Its
attribute ``expression`` is a string in the small language below; the optional attribute
``output_dtype`` (an ONNX ``TensorProto`` data type number) names the output dtype when a
trailing Cast was fused, otherwise the output has the dtype of ``x0``.

Grammar (s-expressions; whitespace separates tokens)::

    expr    := NUMBER | INPUT | "(" OP expr+ ")"
    INPUT   := "x" DIGITS                      -- the node's input of that index
    NUMBER  := a Python float literal: 1, -0.5, 1e-05, inf, -inf
    OP      := one of OPERATORS below, called with exactly its arity
               (max/min take one or more arguments)

Operators (every argument is an expression, so attribute values such as LeakyRelu's alpha
are written as literals)::

    add sub mul div pow            binary arithmetic (ONNX Add Sub Mul Div Pow)
    max min                        1+ arguments (ONNX Max Min)
    neg abs sqrt exp log erf tanh sigmoid relu reciprocal softplus hard_swish
    leaky_relu x alpha             x if x >= 0 else alpha * x
    clip x lo hi                   min(max(x, lo), hi)
    hard_sigmoid x alpha beta      clip(alpha * x + beta, 0, 1)

Example: ``(mul (add x0 x1) 0.5)``. The string is parsed into a tree of the public
dataclasses :class:`Input`, :class:`Literal` and :class:`Call` (never ``eval``-ed); the
reference kernel walks the tree with NumPy in float32 (float64 when an input is float64), so
float16 inputs are computed in float32 and rounded once at the end, as the fused GPU kernel
does. :func:`format_expression` writes a tree back (parse and format round-trip exactly).
Cost: the FLOPs per element of the tree times the output elements; bytes are the inputs read
plus the output written (intermediates never touch memory; that is the point of fusion).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from scipy import special

from engine.ops.common import broadcast_dims
from engine.ops.registry import (
    GIE_DOMAIN,
    Attrs,
    KernelContext,
    KernelError,
    OpCost,
    OpSpec,
    TensorSpec,
)


@dataclass(frozen=True)
class Input:
    """The node input ``x<index>``."""

    index: int


@dataclass(frozen=True)
class Literal:
    """A float constant."""

    value: float


@dataclass(frozen=True)
class Call:
    """An operator applied to argument expressions."""

    op: str
    args: tuple[Expr, ...]


Expr = Input | Literal | Call


class ExpressionError(ValueError):
    """The expression string is malformed (the message says where and why)."""


def _leaky_relu(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, x, x * alpha)


def _hard_sigmoid(x: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    return np.clip(x * alpha + beta, 0, 1)


def _clip(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(x, low), high)


def _hard_swish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x / 6 + 0.5, 0, 1)


def _fold(function: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    def apply(*args: Any) -> Any:
        result = args[0]
        for other in args[1:]:
            result = function(result, other)
        return result

    return apply


@dataclass(frozen=True)
class Operator:
    """An operator of the language: arity (-1 = one or more), NumPy function, FLOPs/element."""

    arity: int
    function: Callable[..., Any]
    flops: int


#: The operators of the language, by name.
OPERATORS: dict[str, Operator] = {
    "add": Operator(2, np.add, 1),
    "sub": Operator(2, np.subtract, 1),
    "mul": Operator(2, np.multiply, 1),
    "div": Operator(2, np.divide, 1),
    "pow": Operator(2, np.power, 4),
    "max": Operator(-1, _fold(np.maximum), 1),
    "min": Operator(-1, _fold(np.minimum), 1),
    "neg": Operator(1, np.negative, 1),
    "abs": Operator(1, np.abs, 1),
    "sqrt": Operator(1, np.sqrt, 4),
    "exp": Operator(1, np.exp, 8),
    "log": Operator(1, np.log, 8),
    "erf": Operator(1, special.erf, 16),
    "tanh": Operator(1, np.tanh, 8),
    "sigmoid": Operator(1, special.expit, 8),
    "relu": Operator(1, lambda x: np.maximum(x, 0), 1),
    "reciprocal": Operator(1, np.reciprocal, 4),
    "softplus": Operator(1, lambda x: np.logaddexp(0, x), 8),
    "hard_swish": Operator(1, _hard_swish, 4),
    "leaky_relu": Operator(2, _leaky_relu, 2),
    "clip": Operator(3, _clip, 2),
    "hard_sigmoid": Operator(3, _hard_sigmoid, 3),
}


# --------------------------------------------------------------------------- parse / format


def _tokenize(text: str) -> list[str]:
    return text.replace("(", " ( ").replace(")", " ) ").split()


def parse_expression(text: str) -> Expr:
    """Parse an expression string into a tree; raises :class:`ExpressionError`."""
    tokens = _tokenize(text)
    if not tokens:
        raise ExpressionError("empty expression")
    tree, position = _parse(tokens, 0)
    if position != len(tokens):
        raise ExpressionError(f"unexpected {tokens[position]!r} after a complete expression")
    return tree


def _parse(tokens: list[str], position: int) -> tuple[Expr, int]:
    if position >= len(tokens):
        raise ExpressionError("unexpected end of expression")
    token = tokens[position]
    if token == ")":
        raise ExpressionError("unexpected ')'")
    if token != "(":
        return _atom(token), position + 1
    if position + 1 >= len(tokens):
        raise ExpressionError("unexpected end of expression after '('")
    name = tokens[position + 1]
    operator = OPERATORS.get(name)
    if operator is None:
        raise ExpressionError(f"unknown operator {name!r}")
    position += 2
    args: list[Expr] = []
    while position < len(tokens) and tokens[position] != ")":
        arg, position = _parse(tokens, position)
        args.append(arg)
    if position >= len(tokens):
        raise ExpressionError(f"missing ')' after ({name} ...")
    wanted = operator.arity
    if (wanted == -1 and not args) or (wanted != -1 and len(args) != wanted):
        expected = "one or more" if wanted == -1 else str(wanted)
        raise ExpressionError(f"{name} takes {expected} arguments, got {len(args)}")
    return Call(name, tuple(args)), position + 1


def _atom(token: str) -> Expr:
    if token.startswith("x") and token[1:].isdigit():
        return Input(int(token[1:]))
    try:
        return Literal(float(token))
    except ValueError:
        raise ExpressionError(f"{token!r} is neither an input (x0, x1...) nor a number") from None


def format_expression(tree: Expr) -> str:
    """The expression string of a tree (``parse_expression`` reads it back unchanged)."""
    if isinstance(tree, Input):
        return f"x{tree.index}"
    if isinstance(tree, Literal):
        return repr(float(tree.value))
    return "(" + " ".join([tree.op, *(format_expression(a) for a in tree.args)]) + ")"


def inputs_used(tree: Expr) -> set[int]:
    """Indices of the inputs the tree reads."""
    if isinstance(tree, Input):
        return {tree.index}
    if isinstance(tree, Literal):
        return set()
    return set().union(*(inputs_used(a) for a in tree.args))


def flops_per_element(tree: Expr) -> int:
    """Operations per output element (each operator weighted like its unfused ONNX op)."""
    if not isinstance(tree, Call):
        return 0
    operator = OPERATORS[tree.op]
    own = operator.flops * (max(len(tree.args) - 1, 1) if operator.arity == -1 else 1)
    return own + sum(flops_per_element(a) for a in tree.args)


def substitute(tree: Expr, mapping: Sequence[Expr]) -> Expr:
    """Replace every ``Input(i)`` by ``mapping[i]`` (splices one Pointwise into another)."""
    if isinstance(tree, Input):
        return mapping[tree.index]
    if isinstance(tree, Literal):
        return tree
    return Call(tree.op, tuple(substitute(a, mapping) for a in tree.args))


# --------------------------------------------------------------------------- evaluation


def compute_dtype(inputs: Sequence[np.ndarray]) -> np.dtype:
    """float64 when an input is float64, else float32 (fp16/bf16 are widened)."""
    if any(np.asarray(x).dtype == np.float64 for x in inputs):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def evaluate(tree: Expr, inputs: Sequence[np.ndarray], dtype: np.dtype | None = None) -> Any:
    """Value of the tree over ``inputs`` in ``dtype`` (default :func:`compute_dtype`)."""
    dtype = dtype or compute_dtype(inputs)
    wide = [np.asarray(x).astype(dtype, copy=False) for x in inputs]
    with np.errstate(all="ignore"):
        return _eval(tree, wide, dtype)


def _eval(tree: Expr, inputs: Sequence[np.ndarray], dtype: np.dtype) -> Any:
    if isinstance(tree, Input):
        if tree.index >= len(inputs):
            raise KernelError(f"expression reads x{tree.index} but the node has {len(inputs)}")
        return inputs[tree.index]
    if isinstance(tree, Literal):
        return dtype.type(tree.value)
    args = [_eval(a, inputs, dtype) for a in tree.args]
    return np.asarray(OPERATORS[tree.op].function(*args)).astype(dtype, copy=False)


def output_dtype(attrs: Attrs, first: ir.DataType | None) -> ir.DataType | None:
    """The node's output dtype: attribute ``output_dtype`` when set, else input 0's dtype."""
    code = attrs.get("output_dtype")
    return ir.DataType(int(code)) if code is not None else first


def _tree(attrs: Attrs) -> Expr:
    text = attrs.str("expression")
    if not text:
        raise KernelError("gie::Pointwise needs a non-empty 'expression' attribute")
    try:
        return parse_expression(text)
    except ExpressionError as error:
        raise KernelError(f"bad Pointwise expression {text!r}: {error}") from None


def _kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    tree = _tree(attrs)
    arrays = [np.asarray(x) for x in inputs]
    result = evaluate(tree, arrays)
    shape = np.broadcast_shapes(*(a.shape for a in arrays)) if arrays else ()
    result = np.broadcast_to(result, np.broadcast_shapes(np.shape(result), shape))
    dtype = output_dtype(attrs, ir.DataType.from_numpy(arrays[0].dtype) if arrays else None)
    target = dtype.numpy() if dtype is not None else np.dtype(np.float32)
    return [np.ascontiguousarray(result).astype(target)]


def _shape_rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    _tree(attrs)
    present = [s for s in specs if s is not None]
    dtype = output_dtype(attrs, present[0].dtype if present else None)
    if any(s.shape is None for s in present):
        return [TensorSpec(None, dtype)]
    return [TensorSpec(broadcast_dims([s.shape for s in present]), dtype)]  # type: ignore[misc]


def _cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    per_element = flops_per_element(_tree(attrs))
    elements = sum(o.numel() for o in outs if o.is_static)
    read = sum(s.nbytes() for s in ins if s is not None)
    return OpCost(per_element * elements, read, sum(o.nbytes() for o in outs))


OPS: list[OpSpec] = [
    OpSpec("Pointwise", _kernel, _shape_rule, _cost, domain=GIE_DOMAIN, family="fused"),
]
