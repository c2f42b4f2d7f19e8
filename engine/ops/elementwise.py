"""Elementwise math, comparisons, logic and bitwise ops (NumPy broadcasting semantics).

Every op keeps the ONNX output dtype exactly: arithmetic keeps the input dtype (integer
division truncates toward zero, as onnxruntime does), comparisons and logic give bool.
Cast and CastLike live in ``cast.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
from scipy import special

from engine.ops.common import broadcast_rule, elementwise_cost, same_as_input, spec, unary
from engine.ops.registry import Attrs, KernelContext, KernelError, OpSpec

BOOL = ir.DataType.BOOL


def _binary(
    op_type: str,
    function: Callable[[np.ndarray, np.ndarray], np.ndarray],
    flops: int = 1,
    result_dtype: ir.DataType | None = None,
) -> OpSpec:
    """Two-input broadcasting op; output dtype is input 0's unless ``result_dtype`` is given."""

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        a, b = inputs
        out = np.asarray(function(a, b))
        if result_dtype is None and out.dtype != a.dtype:
            out = out.astype(a.dtype)
        return [out]

    return spec(
        op_type, kernel, broadcast_rule(result_dtype), elementwise_cost(flops), "elementwise"
    )


def _variadic(op_type: str, function: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> OpSpec:
    """Min/Max/Sum over any number of broadcasting inputs."""

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        present = [x for x in inputs if x is not None]
        result = present[0]
        for other in present[1:]:
            result = function(result, other)
        return [np.asarray(result).astype(present[0].dtype, copy=False)]

    return spec(op_type, kernel, broadcast_rule(), elementwise_cost(1), "elementwise")


def _mean(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    present = [x for x in inputs if x is not None]
    total = present[0]
    for other in present[1:]:
        total = total + other
    return [(total / len(present)).astype(present[0].dtype)]


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu":
        quotient = np.floor_divide(a, b)
        if a.dtype.kind == "i":
            remainder_nonzero = (quotient * b) != a
            quotient = quotient + ((quotient < 0) & remainder_nonzero)
        return quotient
    return np.divide(a, b)


def _pow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if b.size == 1 and a.dtype.kind == "f" and b.ndim <= a.ndim:
        exponent = float(b.reshape(-1)[0])
        if exponent == 2.0:
            return a * a
        if exponent == 3.0:
            return a * a * a
        if exponent == 0.5:
            return np.sqrt(a)
    if a.dtype.kind in "iu" or b.dtype.kind in "iu":
        result = np.power(a.astype(np.float64), b.astype(np.float64))
        return result.astype(a.dtype)
    return np.power(a, b.astype(a.dtype)).astype(a.dtype)


def _mod(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    a, b = inputs
    if attrs.int("fmod", 0) == 1:
        return [np.fmod(a, b).astype(a.dtype)]
    return [np.mod(a, b).astype(a.dtype)]


def _bitshift(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    a, b = inputs
    direction = attrs.str("direction")
    if direction == "LEFT":
        return [np.left_shift(a, b).astype(a.dtype)]
    if direction == "RIGHT":
        return [np.right_shift(a, b).astype(a.dtype)]
    raise KernelError(f"BitShift direction must be LEFT or RIGHT, got {direction!r}")


def _where(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    condition, x, y = inputs
    return [np.where(condition, x, y).astype(x.dtype, copy=False)]


def _isinf(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    positive = attrs.int("detect_positive", 1)
    negative = attrs.int("detect_negative", 1)
    result = np.isinf(x)
    if not positive:
        result &= x < 0
    if not negative:
        result &= x > 0
    return [result]


def _float_unary(function: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], Any]:
    """Run ``function`` in float32 for low-precision floats NumPy has no ufunc loops for."""

    def wrapped(x: np.ndarray) -> Any:
        if x.dtype.kind == "V" or x.dtype.name.startswith(("bfloat", "float8")):
            return function(x.astype(np.float32)).astype(x.dtype)
        return function(x)

    return wrapped


OPS: list[OpSpec] = [
    _binary("Add", np.add),
    _binary("Sub", np.subtract),
    _binary("Mul", np.multiply),
    _binary("Div", _divide),
    _binary("Pow", _pow, flops=4),
    spec("Mod", _mod, broadcast_rule(), elementwise_cost(1), "elementwise"),
    spec("BitShift", _bitshift, broadcast_rule(), elementwise_cost(1), "elementwise"),
    _binary("BitwiseAnd", np.bitwise_and),
    _binary("BitwiseOr", np.bitwise_or),
    _binary("BitwiseXor", np.bitwise_xor),
    unary("BitwiseNot", np.invert),
    _binary("And", np.logical_and, result_dtype=BOOL),
    _binary("Or", np.logical_or, result_dtype=BOOL),
    _binary("Xor", np.logical_xor, result_dtype=BOOL),
    unary("Not", np.logical_not),
    _binary("Equal", np.equal, result_dtype=BOOL),
    _binary("Less", np.less, result_dtype=BOOL),
    _binary("LessOrEqual", np.less_equal, result_dtype=BOOL),
    _binary("Greater", np.greater, result_dtype=BOOL),
    _binary("GreaterOrEqual", np.greater_equal, result_dtype=BOOL),
    spec("Where", _where, broadcast_rule(dtype_from=1), elementwise_cost(1), "elementwise"),
    _variadic("Min", np.minimum),
    _variadic("Max", np.maximum),
    _variadic("Sum", np.add),
    spec("Mean", _mean, broadcast_rule(), elementwise_cost(1), "elementwise"),
    unary("Neg", np.negative),
    unary("Abs", np.abs),
    unary("Sqrt", _float_unary(np.sqrt), flops=4),
    unary("Exp", _float_unary(np.exp), flops=8),
    unary("Log", _float_unary(np.log), flops=8),
    unary("Reciprocal", _float_unary(np.reciprocal), flops=4),
    unary("Floor", _float_unary(np.floor)),
    unary("Ceil", _float_unary(np.ceil)),
    unary("Round", _float_unary(np.round)),
    unary("Sign", np.sign),
    unary("Erf", _float_unary(special.erf), flops=16),
    unary("Sin", _float_unary(np.sin), flops=8),
    unary("Cos", _float_unary(np.cos), flops=8),
    unary("Tan", _float_unary(np.tan), flops=8),
    unary("Asin", _float_unary(np.arcsin), flops=8),
    unary("Acos", _float_unary(np.arccos), flops=8),
    unary("Atan", _float_unary(np.arctan), flops=8),
    unary("Sinh", _float_unary(np.sinh), flops=8),
    unary("Cosh", _float_unary(np.cosh), flops=8),
    unary("Asinh", _float_unary(np.arcsinh), flops=8),
    unary("Acosh", _float_unary(np.arccosh), flops=8),
    unary("Atanh", _float_unary(np.arctanh), flops=8),
    unary("IsNaN", np.isnan, result_dtype=BOOL),
    spec("IsInf", _isinf, same_as_input(0, BOOL), elementwise_cost(1), "elementwise"),
]
