"""gie::Pointwise: the expression language, the reference kernel, shape rule and cost.

Every operator of the language is checked against the unfused ONNX op it stands for, run by
onnxruntime and by the reference interpreter; parsing never evaluates Python.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load
from engine.ops.gie_pointwise import (
    OPERATORS,
    Call,
    ExpressionError,
    Input,
    Literal,
    flops_per_element,
    format_expression,
    inputs_used,
    parse_expression,
)
from engine.ops.registry import Attrs, KernelContext, TensorSpec, default_registry

RNG = np.random.default_rng(7)


def _pointwise_model(
    expression: str, shapes: list[tuple[int, ...]], elem: int = TensorProto.FLOAT, **attrs: int
) -> onnx.ModelProto:
    names = [f"in{i}" for i in range(len(shapes))]
    node = helper.make_node(
        "Pointwise", names, ["y"], domain="gie", name="pw", expression=expression, **attrs
    )
    graph = helper.make_graph(
        [node],
        "pw",
        [helper.make_tensor_value_info(n, elem, s) for n, s in zip(names, shapes)],
        [helper.make_tensor_value_info("y", attrs.get("output_dtype", elem), None)],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("gie", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _run_pointwise(expression: str, arrays: list[np.ndarray], **attrs: int) -> np.ndarray:
    elem = helper.np_dtype_to_tensor_dtype(arrays[0].dtype)
    proto = _pointwise_model(expression, [a.shape for a in arrays], elem, **attrs)
    feeds = {f"in{i}": a for i, a in enumerate(arrays)}
    return ReferenceInterpreter(load(proto)).run(feeds).outputs["y"]


def _onnx_op_model(op: str, n_inputs: int, shape: tuple[int, ...], **attrs: float) -> bytes:
    names = [f"in{i}" for i in range(n_inputs)]
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "op",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


# (operator expression, ONNX op, its attributes, number of tensor inputs)
CASES = [
    ("(add x0 x1)", "Add", {}, 2),
    ("(sub x0 x1)", "Sub", {}, 2),
    ("(mul x0 x1)", "Mul", {}, 2),
    ("(div x0 x1)", "Div", {}, 2),
    ("(pow (abs x0) x1)", None, {}, 2),
    ("(max x0 x1)", "Max", {}, 2),
    ("(min x0 x1)", "Min", {}, 2),
    ("(neg x0)", "Neg", {}, 1),
    ("(abs x0)", "Abs", {}, 1),
    ("(sqrt (abs x0))", None, {}, 1),
    ("(exp x0)", "Exp", {}, 1),
    ("(log (abs x0))", None, {}, 1),
    ("(erf x0)", "Erf", {}, 1),
    ("(tanh x0)", "Tanh", {}, 1),
    ("(sigmoid x0)", "Sigmoid", {}, 1),
    ("(relu x0)", "Relu", {}, 1),
    ("(reciprocal x0)", "Reciprocal", {}, 1),
    ("(softplus x0)", "Softplus", {}, 1),
    ("(hard_swish x0)", "HardSwish", {}, 1),
    ("(leaky_relu x0 0.1)", "LeakyRelu", {"alpha": 0.1}, 1),
    ("(hard_sigmoid x0 0.3 0.4)", "HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 1),
]


@pytest.mark.parametrize(("expression", "op", "attrs", "n_inputs"), CASES)
def test_each_operator_matches_its_onnx_op(
    expression: str, op: str | None, attrs: dict[str, float], n_inputs: int
) -> None:
    arrays = [RNG.standard_normal((2, 3)).astype(np.float32) + 0.1 for _ in range(n_inputs)]
    got = _run_pointwise(expression, arrays)
    assert got.dtype == np.float32 and got.shape == (2, 3)
    if op is None:  # composite cases: checked against NumPy
        x = arrays[0].astype(np.float64)
        want = {
            "(pow (abs x0) x1)": lambda: np.power(np.abs(x), arrays[1]),
            "(sqrt (abs x0))": lambda: np.sqrt(np.abs(x)),
            "(log (abs x0))": lambda: np.log(np.abs(x)),
        }[expression]()
    else:
        session = ort.InferenceSession(_onnx_op_model(op, n_inputs, (2, 3), **attrs))
        want = session.run(None, {f"in{i}": a for i, a in enumerate(arrays)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_clip_and_variadic_max_with_broadcasting() -> None:
    x = RNG.standard_normal((2, 1, 4)).astype(np.float32)
    y = RNG.standard_normal((3, 1)).astype(np.float32)
    got = _run_pointwise("(clip (max x0 x1 0.0) -0.5 0.75)", [x, y])
    want = np.clip(np.maximum(np.maximum(x, y), 0), -0.5, 0.75)
    assert got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, want)


def test_fp16_inputs_are_computed_in_fp32_and_rounded_once() -> None:
    x = RNG.standard_normal((64,)).astype(np.float16)
    got = _run_pointwise("(mul (exp (tanh x0)) 1.1)", [x])
    want = (np.exp(np.tanh(x.astype(np.float32))) * np.float32(1.1)).astype(np.float16)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want)


def test_output_dtype_attribute_casts_the_result() -> None:
    x = RNG.standard_normal((5,)).astype(np.float32)
    got = _run_pointwise("(relu x0)", [x], output_dtype=TensorProto.FLOAT16)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, np.maximum(x, 0).astype(np.float16))


def test_parse_builds_the_public_tree_and_round_trips() -> None:
    tree = parse_expression("(mul (add x0 x1) 0.5)")
    assert tree == Call("mul", (Call("add", (Input(0), Input(1))), Literal(0.5)))
    assert format_expression(tree) == "(mul (add x0 x1) 0.5)"
    assert inputs_used(tree) == {0, 1}
    for text in ["(clip x0 -inf 6.0)", "(leaky_relu x3 0.01)", "1e-05", "x2"]:
        assert format_expression(parse_expression(text)) == format_expression(
            parse_expression(format_expression(parse_expression(text)))
        )
    assert set(OPERATORS) >= {"add", "erf", "clip", "hard_sigmoid", "softplus", "reciprocal"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("(add x0)", "add takes 2 arguments, got 1"),
        ("(frobnicate x0)", "unknown operator 'frobnicate'"),
        ("(add x0 x1", "missing ')'"),
        ("(add x0 x1))", "unexpected ')'"),
        ("__import__('os').system('true')", "neither an input"),
        ("(max)", "one or more"),
        ("y0", "neither an input"),
    ],
)
def test_malformed_expressions_are_refused_without_evaluating(text: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_expression(text)


def test_shape_rule_broadcasts_and_cost_counts_flops_without_intermediates() -> None:
    op = default_registry().lookup("Pointwise", "gie")
    assert op is not None
    attrs = Attrs({"expression": "(relu (mul (add x0 x1) 0.5))"})
    ctx = KernelContext(opset=17)
    specs = [
        TensorSpec((2, "n", 4), ir.DataType.FLOAT),
        TensorSpec((4,), ir.DataType.FLOAT),
    ]
    assert op.shape_rule(specs, attrs, ctx) == [TensorSpec((2, "n", 4), ir.DataType.FLOAT)]
    static = [TensorSpec((2, 3, 4), ir.DataType.FLOAT), TensorSpec((4,), ir.DataType.FLOAT)]
    out = [TensorSpec((2, 3, 4), ir.DataType.FLOAT)]
    cost = op.cost(static, out, attrs)
    assert flops_per_element(parse_expression("(relu (mul (add x0 x1) 0.5))")) == 3
    assert cost.flops == 3 * 24
    assert cost.bytes_read == (24 + 4) * 4 and cost.bytes_written == 24 * 4
    with_cast = Attrs({"expression": "(neg x0)", "output_dtype": int(ir.DataType.FLOAT16)})
    assert op.shape_rule(static[:1], with_cast, ctx)[0].dtype == ir.DataType.FLOAT16
