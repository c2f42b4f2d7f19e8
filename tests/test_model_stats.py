"""Tests of engine.model_stats: interface, histogram, parameters, costs, JSON."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.model_stats import (
    ModelStats,
    compute_stats,
    node_cost,
    tensor_spec,
)
from engine.onnx_io import load
from engine.ops.registry import Attrs, OpCost, OpRegistry, OpSpec, TensorSpec
from engine.text_report import format_stats, human_bytes, human_count

RESNET50 = (
    Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
)


def _matmul_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    m, k = ins[0].shape  # type: ignore[misc]
    n = ins[1].shape[1]  # type: ignore[index]
    return OpCost(2 * m * k * n, ins[0].nbytes() + ins[1].nbytes(), outs[0].nbytes())


def _unused_kernel(inputs: list, attrs: Attrs, ctx: object) -> list:
    raise AssertionError("stats never run kernels")


def _unused_rule(specs: list[TensorSpec], attrs: Attrs, ctx: object) -> list[TensorSpec]:
    raise AssertionError("stats read declared/inferred shapes")


def _relu_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    return OpCost(outs[0].numel(), ins[0].nbytes(), outs[0].nbytes())


def _broken_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    raise ValueError("cannot cost this")


#: A registry of known costs, independent of the real kernels being written.
REGISTRY = OpRegistry(
    [
        OpSpec("MatMul", _unused_kernel, _unused_rule, _matmul_cost),
        OpSpec("Relu", _unused_kernel, _unused_rule, _relu_cost),
        OpSpec("Identity", _unused_kernel, _unused_rule, _relu_cost),
        OpSpec("Neg", _unused_kernel, _unused_rule, _broken_cost),
        OpSpec("If", _unused_kernel, _unused_rule, lambda i, o, a: OpCost(0, 0, 0)),
    ]
)


def _model(batch: int | str = 2) -> onnx.ModelProto:
    """x[batch,4] @ w[4,3] -> Relu -> y; an If whose branches hold Relu/Identity; a Neg; a Foo."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    flag = numpy_helper.from_array(np.array(True), "flag")
    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["r"], ["t_out"], name="then_relu")],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [batch, 3])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["r"], ["e_out"], name="else_id")],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [batch, 3])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node(
            "If", ["flag"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("Neg", ["r"], ["n"], name="neg"),
        helper.make_node("Foo", ["n"], ["z"], name="foo", domain="custom"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
        ],
        [w, flag],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _stats(batch: int | str = 2, **kwargs: object) -> ModelStats:
    return compute_stats(load(_model(batch)), registry=REGISTRY, **kwargs)  # type: ignore[arg-type]


def test_interface_and_histogram() -> None:
    stats = _stats("N")
    assert [(v.name, v.dtype, v.shape) for v in stats.inputs] == [("x", "float32", ("N", 4))]
    assert stats.outputs[0].shape == ("N", 3)
    assert stats.outputs[0].shape_text() == "[N,3]"
    assert stats.op_counts == {
        "Relu": 2,
        "Identity": 1,
        "If": 1,
        "MatMul": 1,
        "Neg": 1,
        "custom::Foo": 1,
    }
    assert stats.node_count == 7
    assert stats.opset_imports == {"ai.onnx": 17, "custom": 1}


def test_parameters() -> None:
    stats = _stats()
    assert stats.initializer_count == 2
    assert stats.parameter_count == 4 * 3 + 1
    assert stats.parameter_bytes == 4 * 3 * 4 + 1


def test_weights_computed_from_constants_are_counted() -> None:
    """ConstantOfShape(shape initializer) -> w feeds a MatMul: w is a folded parameter."""
    shape = numpy_helper.from_array(np.array([4, 3], np.int64), "w_shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w"], name="make_w"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    stats = compute_stats(load(model), registry=REGISTRY)
    assert stats.parameter_count == 2 and stats.initializer_count == 1
    assert stats.folded_parameter_count == 12 and stats.folded_parameter_bytes == 48


def test_costs_static_shapes() -> None:
    stats = _stats(2)
    rows = {row.name: row for row in stats.node_costs}
    assert [row.name for row in stats.node_costs] == ["mm", "relu", "branch", "neg", "foo"]
    assert rows["mm"].known and rows["mm"].flops == 2 * 2 * 4 * 3
    assert rows["mm"].bytes_read == (2 * 4 + 4 * 3) * 4 and rows["mm"].bytes_written == 2 * 3 * 4
    assert rows["relu"].flops == 6
    assert stats.flops == 2 * 2 * 4 * 3 + 6
    unknown = {row.name: row.reason for row in stats.cost_unknown}
    assert "cannot cost this" in unknown["neg"]
    assert "no kernel" in unknown["foo"]
    categories = {row.name: row.category for row in stats.cost_unknown}
    assert categories == {"neg": "rule failed", "foo": "no cost rule"}
    assert [op.qualified_name for op in stats.unsupported_ops] == ["custom::Foo"]


def test_symbolic_dims_make_cost_unknown_until_bound() -> None:
    stats = _stats("N")
    unknown = {row.name: row.reason for row in stats.cost_unknown}
    assert "mm" in unknown and "not static" in unknown["mm"]
    assert {row.category for row in stats.cost_unknown if row.name == "mm"} == {"dynamic shape"}
    assert stats.flops == 0
    bound = _stats("N", dim_values={"N": 2})
    assert bound.flops == _stats(2).flops


def test_tensor_spec_reads_constants() -> None:
    model = load(_model(2))
    weight = model.graph.initializers["w"]
    spec = tensor_spec(weight)
    assert spec.shape == (4, 3) and spec.value is not None and spec.value.shape == (4, 3)
    assert tensor_spec(None) == TensorSpec(None, None)
    row = node_cost(model.graph.node(0), "mm", REGISTRY)
    assert row.known and row.op_type == "MatMul"


def test_text_report() -> None:
    text = "\n".join(format_stats(_stats(2)))
    assert "x: float32[2,4]" in text and "z: float32?" in text
    assert "MatMul" in text and "custom::Foo x1: foo" in text
    assert "cost unknown: 2 node(s)" in text and "Neg x1 (rule failed)" in text
    assert human_count(8.19e9, "FLOPs") == "8.19 GFLOPs" and human_bytes(999) == "999 B"


def test_to_json_round_trips() -> None:
    data = json.loads(json.dumps(_stats(2).to_json()))
    for key in ("inputs", "outputs", "op_counts", "parameters", "flops", "unsupported_ops"):
        assert key in data
    assert data["inputs"][0] == {"name": "x", "dtype": "float32", "shape": [2, 4]}
    assert data["outputs"][1]["shape"] is None
    assert data["parameters"] == {
        "count": 13,
        "bytes": 49,
        "initializers": 2,
        "folded_count": 0,
        "folded_bytes": 0,
    }
    assert data["unsupported_ops"] == [{"op": "custom::Foo", "count": 1, "nodes": ["foo"]}]
    assert set(data["cost_unknown"]) == {"neg", "foo"}


@pytest.mark.skipif(not RESNET50.exists(), reason="onnx wheel without light models")
def test_light_resnet50_with_default_registry() -> None:
    stats = compute_stats(load(RESNET50))
    expected = Counter(node.op_type for node in onnx.load(RESNET50).graph.node)
    assert stats.op_counts == dict(expected)
    assert stats.inputs[0].shape == (1, 3, 224, 224)
    conv_rows = [row for row in stats.node_costs if row.op_type == "Conv" and row.known]
    # ResNet-50 is about 4.1 G multiply-adds; the convolutions alone are most of it.
    if len(conv_rows) == expected["Conv"]:
        conv_flops = sum(row.flops for row in conv_rows)
        assert 7.0e9 < conv_flops < 8.5e9
