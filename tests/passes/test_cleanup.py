"""O1 cleanup: every rule's structure, numerics (reference and onnxruntime) and refusals."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load
from engine.passes import PassManager, StepRecorder, optimize, replay
from engine.passes.cleanup import CLEANUP_PASSES, holds_exactly
from engine.passes.graph_text import canonical_text
from engine.passes.pipelines import prepare_for_optimization

F = TensorProto.FLOAT
SHAPE = [2, 4]


def _tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(values), name)


def _model(
    nodes: list[onnx.NodeProto],
    initializers: dict[str, np.ndarray] | None = None,
    inputs: list[onnx.ValueInfoProto] | None = None,
    output_shape: list[int] | None = None,
) -> onnx.ModelProto:
    """A graph x[2,4] -> nodes -> y (float)."""
    graph = helper.make_graph(
        nodes,
        "cleanup_case",
        inputs or [helper.make_tensor_value_info("x", F, SHAPE)],
        [helper.make_tensor_value_info("y", F, output_shape)],
        [_tensor(k, v) for k, v in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model


def _relu(src: str = "x", dst: str = "h") -> onnx.NodeProto:
    """Gives the rules a non-input value to forward."""
    return helper.make_node("Relu", [src], [dst], name=f"relu_{dst}")


def _feeds(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in proto.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def _cleanup(proto: onnx.ModelProto) -> tuple[ir.Model, StepRecorder]:
    """Run the cleanup passes through a PassManager, with the per-step numeric check on."""
    model = prepare_for_optimization(load(proto))
    recorder = StepRecorder(check_feeds=_feeds(proto))
    PassManager(CLEANUP_PASSES, [recorder]).run(model)
    return model, recorder


def _ops(model: ir.Model) -> Counter[str]:
    return Counter(node.op_type for node in model.graph)


def _rule_steps(recorder: StepRecorder, rule: str) -> int:
    return sum(1 for step in recorder.steps if step.rule == rule)


def _assert_same_numbers(proto: onnx.ModelProto, optimized: ir.Model) -> None:
    feeds = _feeds(proto)
    expected = ReferenceInterpreter(load(proto)).run(feeds).outputs
    actual = ReferenceInterpreter(optimized).run(feeds).outputs
    from_ort = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)
    for (name, want), theirs in zip(expected.items(), from_ort):
        np.testing.assert_allclose(actual[name], want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(actual[name], theirs, rtol=1e-5, atol=1e-6)
        assert actual[name].dtype == want.dtype and actual[name].shape == want.shape


ONES = np.ones(4, np.float32)
ZEROS = np.zeros(4, np.float32)
BIG_ONES = np.ones((3, 2, 4), np.float32)


def _binary(op: str, constant: np.ndarray, constant_first: bool = False) -> onnx.ModelProto:
    inputs = ["c", "h"] if constant_first else ["h", "c"]
    nodes = [_relu(), helper.make_node(op, inputs, ["y"], name=f"{op.lower()}_node")]
    return _model(nodes, {"c": constant})


def _unary(op: str, src: str = "h", extra: list[str] = (), **attrs: object) -> list:
    return [helper.make_node(op, [src, *extra], ["y"], name=f"{op.lower()}_node", **attrs)]


# rule -> (positive model, removed op type, expected applications,
#          negative model, reason fragment)
Case = tuple[Callable[[], onnx.ModelProto], str, int, Callable[[], onnx.ModelProto], str]
CASES: dict[str, Case] = {
    "remove_identity": (
        lambda: _model(
            [
                _relu(),
                helper.make_node("Identity", ["h"], ["i"], name="id_inner"),
                helper.make_node("Relu", ["i"], ["j"], name="relu_j"),
                helper.make_node("Identity", ["j"], ["y"], name="id_output"),
            ]
        ),
        "Identity",
        2,
        lambda: _model(_unary("Identity", "x")),
        "is a graph input",
    ),
    "remove_dropout": (
        lambda: _model([_relu(), *_unary("Dropout", extra=["ratio"])], {"ratio": np.float32(0.5)}),
        "Dropout",
        1,
        lambda: _model(
            [_relu(), *_unary("Dropout", extra=["ratio", "train"])],
            {"ratio": np.float32(0.0)},
            [
                helper.make_tensor_value_info("x", F, SHAPE),
                helper.make_tensor_value_info("train", TensorProto.BOOL, []),
            ],
        ),
        "training_mode is not a constant false",
    ),
    "remove_mul_by_one": (
        lambda: _binary("Mul", np.float32(1.0), constant_first=True),
        "Mul",
        1,
        lambda: _binary("Mul", BIG_ONES),
        "broadcasts",
    ),
    "remove_add_zero": (
        lambda: _binary("Add", ZEROS),
        "Add",
        1,
        lambda: _binary("Add", np.zeros((3, 2, 4), np.float32)),
        "broadcasts",
    ),
    "remove_sub_zero": (
        lambda: _binary("Sub", ZEROS),
        "Sub",
        1,
        lambda: _binary("Sub", np.zeros((3, 1, 1), np.float32)),
        "broadcasts",
    ),
    "remove_div_by_one": (
        lambda: _binary("Div", ONES.reshape(1, 4)),
        "Div",
        1,
        lambda: _binary("Div", BIG_ONES),
        "broadcasts",
    ),
    "remove_noop_transpose": (
        lambda: _model([_relu(), *_unary("Transpose", perm=[0, 1])]),
        "Transpose",
        1,
        lambda: _model(_unary("Transpose", "x", perm=[0, 1])),
        "is a graph input",
    ),
    "remove_noop_expand": (
        lambda: _model([_relu(), *_unary("Expand", extra=["s"])], {"s": np.array([1, 4])}),
        "Expand",
        1,
        lambda: _model([_relu(), *_unary("Expand", extra=["s"])], {"s": np.array([3, 2, 4])}),
        "changes the shape",
    ),
    "remove_noop_reshape": (
        lambda: _model([_relu(), *_unary("Reshape", extra=["s"])], {"s": np.array([0, -1])}),
        "Reshape",
        1,
        lambda: _model([_relu(), *_unary("Reshape", extra=["s"])], {"s": np.array([4, 2])}),
        "not provably the input shape",
    ),
    "remove_noop_cast": (
        lambda: _model([_relu(), *_unary("Cast", to=F)]),
        "Cast",
        1,
        lambda: _model(_unary("Cast", "x", to=F)),
        "is a graph input",
    ),
    "merge_cast_chain": (
        lambda: _model(
            [
                _relu(),
                helper.make_node("Cast", ["h"], ["d"], name="to_double", to=TensorProto.DOUBLE),
                helper.make_node("Cast", ["d"], ["y"], name="to_float", to=F),
            ]
        ),
        "Cast",
        1,
        lambda: _model(
            [
                _relu(),
                helper.make_node("Cast", ["h"], ["d"], name="to_half", to=TensorProto.FLOAT16),
                helper.make_node("Cast", ["d"], ["y"], name="to_float", to=F),
            ]
        ),
        "loses values",
    ),
}


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_structure_and_numerics(rule: str) -> None:
    positive, op_type, applications, _, _ = CASES[rule]
    proto = positive()
    model, recorder = _cleanup(proto)
    assert _rule_steps(recorder, rule) == applications
    assert _ops(model)[op_type] == 0
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert all(step.numeric_check.max_abs == 0.0 for step in recorder.steps if step.numeric_check)
    _assert_same_numbers(proto, model)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_refuses_with_reason(rule: str) -> None:
    _, op_type, _, negative, fragment = CASES[rule]
    proto = negative()
    model, recorder = _cleanup(proto)
    assert _rule_steps(recorder, rule) == 0
    assert _ops(model)[op_type] >= 1
    reasons = [w.reason for w in recorder.why_not.values() if w.rule == rule]
    assert reasons and fragment in reasons[0], reasons
    _assert_same_numbers(proto, model)


def test_identity_to_graph_output_keeps_the_output_name() -> None:
    proto = CASES["remove_identity"][0]()
    result = optimize(load(proto), "O1")
    relu_j = next(n for n in result.model.graph if n.name == "relu_j")
    assert relu_j.outputs[0].name == "y" and relu_j.outputs[0].is_graph_output()
    _assert_same_numbers(proto, result.model)


def test_no_near_miss_noise_on_plain_arithmetic() -> None:
    """A Mul by a non-one constant is not a near match: no WhyNot is recorded for it."""
    model, recorder = _cleanup(_binary("Mul", np.full(4, 2.0, np.float32)))
    assert _ops(model)["Mul"] == 1
    assert not recorder.why_not


def test_dead_code_elimination() -> None:
    nodes = [
        _relu(),
        helper.make_node("Neg", ["h"], ["unused"], name="dead_neg"),
        helper.make_node("Exp", ["unused"], ["unused2"], name="dead_exp"),
        helper.make_node("Abs", ["h"], ["y"], name="abs"),
    ]
    proto = _model(nodes, {"orphan": ONES})
    model, recorder = _cleanup(proto)
    steps = [s for s in recorder.steps if s.pass_name == "dead_code_elimination"]
    assert len(steps) == 1 and set(steps[0].removed) == {"dead_neg", "dead_exp"}
    assert "orphan" not in model.graph.initializers
    assert _ops(model) == Counter({"Relu": 1, "Abs": 1})
    _assert_same_numbers(proto, model)


def test_dead_code_keeps_graph_outputs() -> None:
    proto = _model([_relu(), helper.make_node("Abs", ["h"], ["y"], name="abs")])
    model, recorder = _cleanup(proto)
    assert not recorder.steps and _ops(model) == Counter({"Relu": 1, "Abs": 1})


def test_deduplicate_initializers() -> None:
    nodes = [
        helper.make_node("Add", ["x", "a"], ["s"], name="add_a"),
        helper.make_node("Mul", ["s", "b"], ["t"], name="mul_b"),
        helper.make_node("Sub", ["t", "c"], ["y"], name="sub_c"),
    ]
    twos = np.full(4, 2.0, np.float32)
    proto = _model(nodes, {"a": twos, "b": twos.copy(), "c": twos + 1})
    model, recorder = _cleanup(proto)
    assert any(s.pass_name == "deduplicate_initializers" for s in recorder.steps)
    assert sorted(model.graph.initializers) == ["a", "c"]  # c differs: kept
    _assert_same_numbers(proto, model)


def test_common_subexpression_elimination() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r1"], name="relu_1"),
        helper.make_node("Relu", ["x"], ["r2"], name="relu_2"),
        helper.make_node("RandomUniformLike", ["x"], ["u1"], name="rand_1", seed=1.0),
        helper.make_node("RandomUniformLike", ["x"], ["u2"], name="rand_2", seed=1.0),
        helper.make_node("Sum", ["r1", "r2", "u1", "u2"], ["y"], name="sum"),
    ]
    proto = _model(nodes)
    model, recorder = _cleanup(proto)
    steps = [s for s in recorder.steps if s.pass_name == "common_subexpression_elimination"]
    assert len(steps) == 1 and steps[0].removed == ("relu_2",)
    assert _ops(model) == Counter({"Relu": 1, "RandomUniformLike": 2, "Sum": 1})


def test_o1_replay_reproduces_the_cleanup() -> None:
    proto = CASES["merge_cast_chain"][0]()
    result = optimize(load(proto), "O1")
    assert canonical_text(replay(load(proto), result.steps, "O1")) == canonical_text(result.model)


@pytest.mark.parametrize(
    ("source", "target", "exact"),
    [
        (TensorProto.FLOAT, TensorProto.DOUBLE, True),
        (TensorProto.FLOAT16, TensorProto.FLOAT, True),
        (TensorProto.INT32, TensorProto.INT64, True),
        (TensorProto.UINT8, TensorProto.INT16, True),
        (TensorProto.INT16, TensorProto.FLOAT, True),
        (TensorProto.BOOL, TensorProto.INT8, True),
        (TensorProto.FLOAT, TensorProto.FLOAT16, False),
        (TensorProto.INT64, TensorProto.INT32, False),
        (TensorProto.INT8, TensorProto.UINT8, False),
        (TensorProto.INT32, TensorProto.FLOAT, False),
        (TensorProto.BFLOAT16, TensorProto.FLOAT16, False),
    ],
)
def test_holds_exactly(source: int, target: int, exact: bool) -> None:
    assert holds_exactly(ir.DataType(source), ir.DataType(target)) is exact
