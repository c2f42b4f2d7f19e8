"""GELU fusion rules (part of O3's ``transformer_norms`` pass) -> gie::Gelu.

``gelu_erf``: x * 0.5 * (1 + erf(x / sqrt(2))) in its exporter orderings (Div by 1.4142.. or
Mul by 0.7071..; the 0.5 first, last or inside). ``gelu_tanh``: the GPT-2 form
0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), with Pow(3) or x*x*x.
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from engine.passes.transformer_attention import GIE, const_scalar, fail, group, node_name


def _erf_term(op: Any, x: Any, root2: Any, one: Any) -> Any:
    scaled = pattern.OrValue(
        [op.Div(x, root2), op.Mul(x, root2)], tag_var="erf_scaling", tag_values=["Div", "Mul"]
    )
    return op.Add(op.Erf(scaled), one)


def _gelu_erf_half_last(op: Any, x: Any, root2: Any, one: Any, half: Any) -> Any:
    return op.Mul(op.Mul(x, _erf_term(op, x, root2, one)), half, _outputs=["gelu"])


def _gelu_erf_half_first(op: Any, x: Any, root2: Any, one: Any, half: Any) -> Any:
    return op.Mul(op.Mul(x, half), _erf_term(op, x, root2, one), _outputs=["gelu"])


def _gelu_erf_half_inner(op: Any, x: Any, root2: Any, one: Any, half: Any) -> Any:
    return op.Mul(x, op.Mul(_erf_term(op, x, root2, one), half), _outputs=["gelu"])


def _check_constants(where: str, expected: dict[str, tuple[Any, float]]) -> MatchResult:
    for label, (value, wanted) in expected.items():
        found = const_scalar(value)
        if found is None:
            return fail(f"{where}: {label} ({node_name(value)}) is not a constant scalar")
        if not math.isclose(found, wanted, rel_tol=1e-4):
            return fail(f"{where}: {label} is {found:.6g}, not {wanted:.6g}")
    return MatchResult()


def _gelu_erf_check(
    context: Any,
    root2: ir.Value,
    one: ir.Value,
    half: ir.Value,
    erf_scaling: str,
    gelu: ir.Value,
    **_: Any,
) -> MatchResult:
    root = (
        (math.sqrt(2.0), "the Erf input divisor")
        if erf_scaling == "Div"
        else (math.sqrt(0.5), "the Erf input factor")
    )
    return _check_constants(
        f"GELU not fused at {node_name(gelu)}",
        {
            root[1]: (root2, root[0]),
            "the constant added to Erf": (one, 1.0),
            "the factor 0.5": (half, 0.5),
        },
    )


def _gelu_erf_rewrite(op: Any, x: ir.Value, **_: Any) -> Any:
    return op.Gelu(x, _domain=GIE, approximate="none")


def _tanh_term(op: Any, x: Any, c3: Any, c1: Any, one: Any, three: Any) -> Any:
    cube = pattern.OrValue(
        [op.Pow(x, three), op.Mul(op.Mul(x, x), x)], tag_var="cube_form", tag_values=list(range(2))
    )
    inner = op.Add(x, op.Mul(cube, c3))
    return op.Add(op.Tanh(op.Mul(inner, c1)), one)


def _gelu_tanh_half_first(
    op: Any, x: Any, c3: Any, c1: Any, one: Any, three: Any, half: Any
) -> Any:
    return op.Mul(op.Mul(x, half), _tanh_term(op, x, c3, c1, one, three), _outputs=["gelu"])


def _gelu_tanh_half_last(op: Any, x: Any, c3: Any, c1: Any, one: Any, three: Any, half: Any) -> Any:
    return op.Mul(op.Mul(x, _tanh_term(op, x, c3, c1, one, three)), half, _outputs=["gelu"])


def _gelu_tanh_check(
    context: Any,
    c3: ir.Value,
    c1: ir.Value,
    one: ir.Value,
    three: Any,
    half: ir.Value,
    gelu: ir.Value,
    **_: Any,
) -> MatchResult:
    expected = {
        "the cubic coefficient": (c3, 0.044715),
        "the Tanh input factor": (c1, math.sqrt(2 / math.pi)),
        "the constant added to Tanh": (one, 1.0),
        "the factor 0.5": (half, 0.5),
    }
    if three is not None:
        expected["the exponent"] = (three, 3.0)
    return _check_constants(f"GELU (tanh) not fused at {node_name(gelu)}", expected)


def _gelu_tanh_rewrite(op: Any, x: ir.Value, **_: Any) -> Any:
    return op.Gelu(x, _domain=GIE, approximate="tanh")


gelu_erf = group(
    "gelu_erf",
    [_gelu_erf_half_last, _gelu_erf_half_first, _gelu_erf_half_inner],
    _gelu_erf_rewrite,
    _gelu_erf_check,
)
gelu_tanh = group(
    "gelu_tanh", [_gelu_tanh_half_first, _gelu_tanh_half_last], _gelu_tanh_rewrite, _gelu_tanh_check
)
