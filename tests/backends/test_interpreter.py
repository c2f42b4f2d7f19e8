"""The reference interpreter: taps, freeing after last use, errors that name the node."""

from __future__ import annotations

import weakref

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from engine.backends.numpy_ref import InputError, NodeExecutionError, ReferenceInterpreter
from engine.backends.numpy_ref.interpreter import UnsupportedModelError
from engine.onnx_io import load


def _chain_model() -> onnx.ModelProto:
    """x -> Neg(a) -> Abs(b) -> Exp(c) -> Add(c, x) -> y: each value used once, except x."""
    nodes = [
        helper.make_node("Neg", ["x"], ["a"], name="neg"),
        helper.make_node("Abs", ["a"], ["b"], name="abs"),
        helper.make_node("Exp", ["b"], ["c"], name="exp"),
        helper.make_node("Add", ["c", "x"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tap_sees_every_intermediate_in_order() -> None:
    seen: list[tuple[str, np.ndarray]] = []
    x = np.array([-1.0, 0.0, 2.0, -3.0], np.float32)
    result = ReferenceInterpreter(load(_chain_model())).run(
        {"x": x}, tap=lambda node, outputs: seen.append((node.name, outputs[0].copy()))
    )
    assert [name for name, _ in seen] == ["neg", "abs", "exp", "add"]
    np.testing.assert_array_equal(seen[1][1], np.abs(x))
    np.testing.assert_allclose(result.outputs["y"], np.exp(np.abs(x)) + x, rtol=1e-6)


def test_values_are_freed_after_their_last_use() -> None:
    produced: dict[str, weakref.ref] = {}
    alive_when: dict[str, list[str]] = {}

    def tap(node: ir.Node, outputs: list) -> None:
        alive_when[node.name] = [name for name, ref in produced.items() if ref() is not None]
        produced[node.outputs[0].name] = weakref.ref(outputs[0])

    ReferenceInterpreter(load(_chain_model())).run({"x": np.ones(4, np.float32)}, tap=tap)
    # When 'exp' runs, 'a' (last used by 'abs') is gone; 'b' is still held by exp's inputs.
    assert "a" not in alive_when["exp"]
    assert "a" not in alive_when["add"] and "b" not in alive_when["add"]


def test_profile_gives_one_timing_per_node() -> None:
    result = ReferenceInterpreter(load(_chain_model())).run(
        {"x": np.ones(4, np.float32)}, profile=True
    )
    assert [t.node_name for t in result.timings] == ["neg", "abs", "exp", "add"]
    assert all(t.seconds >= 0 for t in result.timings)


def test_kernel_failure_names_node_op_and_input_shapes() -> None:
    node = helper.make_node("Add", ["x", "w"], ["y"], name="bad_add")
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, ["m"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(NodeExecutionError) as caught:
        ReferenceInterpreter(model).run({"x": np.ones(3, np.float32), "w": np.ones(4, np.float32)})
    message = str(caught.value)
    assert "'bad_add' (Add)" in message and "float32[3], float32[4]" in message


def test_feed_errors_name_the_input() -> None:
    interpreter = ReferenceInterpreter(load(_chain_model()))
    with pytest.raises(InputError, match=r"unknown input name\(s\) \['z'\]"):
        interpreter.run({"z": np.ones(4, np.float32)})
    with pytest.raises(InputError, match="missing input 'x'"):
        interpreter.run({})
    with pytest.raises(InputError, match="input 'x' has dtype float64"):
        interpreter.run({"x": np.ones(4)})
    with pytest.raises(InputError, match=r"input 'x' has shape \[5\]"):
        interpreter.run({"x": np.ones(5, np.float32)})


def test_unsupported_op_is_refused_before_running() -> None:
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="f", domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    with pytest.raises(UnsupportedModelError, match="com.example::Frobnicate"):
        ReferenceInterpreter(load(proto))


def test_constant_subgraphs_are_precomputed_once_but_still_tapped() -> None:
    """A weight built by ConstantOfShape (as in the light models) is computed at preparation."""
    shape = onnx.numpy_helper.from_array(np.array([4], np.int64), "w_shape")
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["w_shape"],
            ["w"],
            name="make_w",
            value=onnx.numpy_helper.from_array(np.array([0.5], np.float32)),
        ),
        helper.make_node("Add", ["x", "w"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [shape],
    )
    model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    interpreter = ReferenceInterpreter(model)
    tapped: list[str] = []
    result = interpreter.run(
        {"x": np.ones(4, np.float32)},
        tap=lambda node, outs: tapped.append(node.name),
        profile=True,
    )
    np.testing.assert_array_equal(result.outputs["y"], np.full(4, 1.5, np.float32))
    assert tapped == ["make_w", "add"]
    assert [t.node_name for t in result.timings] == ["add"]
