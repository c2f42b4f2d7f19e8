"""Pointwise fusion: structure, numerics (reference + onnxruntime), refusals, replay."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load
from engine.passes import optimize, replay
from engine.passes.graph_text import canonical_text
from engine.passes.manager import PassManager, StepRecorder
from engine.passes.pointwise import POINTWISE_PASSES

RNG = np.random.default_rng(3)
F = TensorProto.FLOAT


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[int, list[int]]],
    outputs: list[str],
    initializers: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(n, 0, None) for n in outputs],
        [numpy_helper.from_array(a, n) for n, a in (initializers or {}).items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(proto)


def _run_pass(proto: onnx.ModelProto):
    model = load(proto)
    recorder = StepRecorder()
    PassManager(POINTWISE_PASSES, [recorder]).run(model)
    return model, recorder


def _ops(model) -> Counter[str]:
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph)


def _check_numerics(proto: onnx.ModelProto, optimized, feeds: dict[str, np.ndarray]) -> None:
    want = ReferenceInterpreter(load(proto)).run(feeds).outputs
    got = ReferenceInterpreter(optimized).run(feeds).outputs
    session = ort.InferenceSession(proto.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    for name, ort_value in zip(names, session.run(None, feeds)):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[name], ort_value, rtol=1e-5, atol=1e-6)


def _chain() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["x", "y"], ["a"], name="Add_0"),
        helper.make_node("Mul", ["a", "half"], ["b"], name="Mul_1"),
        helper.make_node("LeakyRelu", ["b"], ["c"], name="Leaky_2", alpha=0.2),
        helper.make_node("Clip", ["c", "lo", ""], ["d"], name="Clip_3"),
        helper.make_node("Sigmoid", ["d"], ["z"], name="Sigmoid_4"),
    ]
    inits = {"half": np.array(0.5, np.float32), "lo": np.array(-0.1, np.float32)}
    return _model(nodes, {"x": (F, [2, 3]), "y": (F, [3])}, ["z"], inits)


FEEDS = {
    "x": RNG.standard_normal((2, 3)).astype(np.float32),
    "y": RNG.standard_normal((3,)).astype(np.float32),
}


def test_chain_becomes_one_pointwise_with_scalar_literals() -> None:
    proto = _chain()
    model, recorder = _run_pass(proto)
    assert _ops(model) == Counter({"gie::Pointwise": 1})
    [node] = list(model.graph)
    expression = node.attributes["expression"].value
    # Attribute and initializer literals keep their exact float32 values.
    alpha, low = float(np.float32(0.2)), float(np.float32(-0.1))
    assert expression == f"(sigmoid (clip (leaky_relu (mul (add x0 x1) 0.5) {alpha}) {low} inf))"
    assert [v.name for v in node.inputs] == ["x", "y"]
    assert [s.rule for s in recorder.steps] == ["fuse_pointwise_chain"]
    assert recorder.steps[0].anchor == "Sigmoid_4"
    _check_numerics(proto, model, FEEDS)


def test_o2_fuses_and_replays_the_same_graph() -> None:
    proto = _chain()
    original = load(proto)
    result = optimize(original, "O2")
    assert _ops(result.model)["gie::Pointwise"] == 1
    fused = [s for s in result.steps if s.rule == "fuse_pointwise_chain"]
    assert len(fused) == 1
    assert set(fused[0].provenance[fused[0].added[0]]) == {
        "Add_0",
        "Mul_1",
        "Leaky_2",
        "Clip_3",
        "Sigmoid_4",
    }
    assert canonical_text(replay(original, result.steps, "O2")) == canonical_text(result.model)
    disabled = optimize(original, "O2", disabled=["fuse_pointwise_chain"])
    assert _ops(disabled.model)["gie::Pointwise"] == 0


def _diamond(escape: bool) -> onnx.ModelProto:
    """Add_7 feeds Exp_8 and, through a Transpose when ``escape``, Tanh_10."""
    tanh_input = "t" if escape else "a"
    nodes = [
        helper.make_node("Add", ["x", "y"], ["a"], name="Add_7"),
        helper.make_node("Exp", ["a"], ["b"], name="Exp_8"),
        helper.make_node("Transpose", ["a"], ["t"], name="Transpose_9", perm=[0, 1]),
        helper.make_node("Tanh", [tanh_input], ["c"], name="Tanh_10"),
        helper.make_node("Sub", ["b", "c"], ["d"], name="Sub_11"),
        helper.make_node("Abs", ["d"], ["z"], name="Abs_12"),
    ]
    if not escape:
        del nodes[2]
    return _model(nodes, {"x": (F, [3, 3]), "y": (F, [3, 3])}, ["z"])


def test_shared_intermediate_inside_the_tree_is_fused_once() -> None:
    proto = _diamond(escape=False)
    model, recorder = _run_pass(proto)
    [fused] = list(model.graph)
    expression = "(abs (sub (exp (add x0 x1)) (tanh (add x0 x1))))"
    assert fused.attributes["expression"].value == expression
    assert [s.rule for s in recorder.steps] == ["fuse_pointwise_chain"]
    x = RNG.standard_normal((3, 3)).astype(np.float32)
    _check_numerics(proto, model, {"x": x, "y": x.T.copy()})


def test_intermediate_read_outside_the_tree_is_refused_with_a_reason() -> None:
    proto = _diamond(escape=True)
    model, recorder = _run_pass(proto)
    assert _ops(model) == Counter({"Add": 1, "Transpose": 1, "gie::Pointwise": 1})
    [fused] = [n for n in model.graph if n.op_type == "Pointwise"]
    assert fused.attributes["expression"].value == "(abs (sub (exp x0) (tanh x1)))"
    why = recorder.why_not[("fuse_pointwise_chain", "Add_7")]
    assert why.reason == "Add_7 not fused into Pointwise: its output feeds 2 consumers"
    x = RNG.standard_normal((3, 3)).astype(np.float32)
    _check_numerics(proto, model, {"x": x, "y": x + 1})


def test_existing_pointwise_is_extended() -> None:
    node = helper.make_node(
        "Pointwise", ["x", "y"], ["p"], domain="gie", name="Pw_0", expression="(add x0 x1)"
    )
    tanh = helper.make_node("Tanh", ["p"], ["q"], name="Tanh_1")
    cast = helper.make_node("Cast", ["q"], ["z"], name="Cast_2", to=TensorProto.FLOAT16)
    graph = helper.make_graph(
        [node, tanh, cast],
        "g",
        [helper.make_tensor_value_info("x", F, [2, 3]), helper.make_tensor_value_info("y", F, [3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT16, [2, 3])],
        value_info=[
            helper.make_tensor_value_info("p", F, [2, 3]),
            helper.make_tensor_value_info("q", F, [2, 3]),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("gie", 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    model, recorder = _run_pass(proto)
    [fused] = list(model.graph)
    assert fused.attributes["expression"].value == "(tanh (add x0 x1))"
    assert fused.attributes["output_dtype"].value == TensorProto.FLOAT16
    assert [s.rule for s in recorder.steps] == ["extend_pointwise"]
    want = ReferenceInterpreter(load(proto)).run(FEEDS).outputs["z"]
    got = ReferenceInterpreter(model).run(FEEDS).outputs["z"]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want)
    expected = np.tanh(FEEDS["x"] + FEEDS["y"]).astype(np.float16)
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=1e-3)


def test_graph_outputs_and_integer_ops_are_not_fused() -> None:
    nodes = [
        helper.make_node("Add", ["i", "one"], ["e"], name="Add_0"),
        helper.make_node("Pow", ["x", "e"], ["p"], name="Pow_1"),
        helper.make_node("Relu", ["p"], ["r"], name="Relu_2"),
        helper.make_node("Neg", ["r"], ["z"], name="Neg_3"),
    ]
    inputs = {"x": (F, [4]), "i": (TensorProto.INT64, [4])}
    proto = _model(nodes, inputs, ["z", "r"], {"one": np.array(1, np.int64)})
    model, recorder = _run_pass(proto)
    assert _ops(model) == Counter({"Add": 1, "Pow": 1, "Relu": 1, "Neg": 1})
    assert not recorder.steps
    reasons = {key[1]: why.reason for key, why in recorder.why_not.items()}
    assert reasons["Relu_2"] == "Relu_2 not fused into Pointwise: its output is a graph output"
    feeds = {"x": np.abs(FEEDS["x"][0, :]).repeat(2)[:4], "i": np.arange(4, dtype=np.int64)}
    _check_numerics(proto, model, feeds)


def test_integer_producer_is_refused_with_its_dtype() -> None:
    nodes = [
        helper.make_node("Add", ["i", "j"], ["e"], name="Add_0"),
        helper.make_node("Pow", ["x", "e"], ["p"], name="Pow_1"),
        helper.make_node("Relu", ["x"], ["r"], name="Relu_2"),
        helper.make_node("Add", ["p", "r"], ["z"], name="Add_3"),
    ]
    inputs = {"x": (F, [4]), "i": (TensorProto.INT64, [4]), "j": (TensorProto.INT64, [4])}
    proto = _model(nodes, inputs, ["z"])
    model, recorder = _run_pass(proto)
    # Pow reads a non-constant integer exponent, so only Relu joins the final Add.
    assert _ops(model) == Counter({"Add": 1, "Pow": 1, "gie::Pointwise": 1})
    reasons = {key[1]: why.reason for key, why in recorder.why_not.items()}
    assert reasons["Pow_1"] == (
        "Pow_1 not fused into Pointwise: one of its inputs is not a float tensor"
    )
    feeds = {
        "x": np.abs(FEEDS["y"]).repeat(2)[:4] + 0.5,
        "i": np.arange(4, dtype=np.int64),
        "j": np.ones(4, np.int64),
    }
    _check_numerics(proto, model, feeds)


def test_rank_growing_constant_stays_an_input() -> None:
    nodes = [
        helper.make_node("Mul", ["x", "c"], ["a"], name="Mul_0"),
        helper.make_node("Exp", ["a"], ["z"], name="Exp_1"),
    ]
    proto = _model(nodes, {"x": (F, [3])}, ["z"], {"c": np.full((1, 1), 2.0, np.float32)})
    model, _ = _run_pass(proto)
    [fused] = list(model.graph)
    assert [v.name for v in fused.inputs] == ["x", "c"]
    feeds = {"x": FEEDS["y"]}
    out = ReferenceInterpreter(model).run(feeds).outputs["z"]
    assert out.shape == (1, 3)
    _check_numerics(proto, model, feeds)
