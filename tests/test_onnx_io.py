"""engine.onnx_io: loading from every source, normalisation, and clear refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.backends.numpy_ref import ReferenceInterpreter
from engine.examples import light_model_path
from engine.onnx_io import ModelLoadError, load, save, unsupported_ops


def _relu_add_model(opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """x -> Add(x, const via Constant node) -> Relu -> y, with named nodes."""
    const = helper.make_node(
        "Constant",
        [],
        ["c"],
        name="make_c",
        value=numpy_helper.from_array(np.array([1.0, -2.0, 3.0], np.float32)),
    )
    add = helper.make_node("Add", ["x", "c"], ["s"], name="add_0")
    relu = helper.make_node("Relu", ["s"], ["y"], name="relu_0")
    graph = helper.make_graph(
        [const, add, relu],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def _run_both(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[list, list]:
    ours = ReferenceInterpreter(load(model)).run(feeds).outputs
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = session.run(None, feeds)
    return list(ours.values()), theirs


def test_load_from_path_bytes_and_proto_give_the_same_graph(tmp_path) -> None:
    proto = _relu_add_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    texts = {ir.to_onnx_text(load(src)) for src in (proto, proto.SerializeToString(), path)}
    assert len(texts) == 1
    assert load(str(path)).meta["source"] == str(path)


def test_constant_nodes_become_initializers_and_shapes_are_inferred() -> None:
    model = load(_relu_add_model())
    assert [n.op_type for n in model.graph] == ["Add", "Relu"]
    assert "c" in model.graph.initializers
    np.testing.assert_array_equal(model.graph.initializers["c"].const_value.numpy(), [1, -2, 3])
    intermediate = next(n for n in model.graph if n.op_type == "Add").outputs[0]
    assert intermediate.shape == ir.Shape([2, 3])
    assert intermediate.dtype == ir.DataType.FLOAT


@pytest.mark.parametrize("opset", range(11, 24))
def test_opsets_11_through_23_load_and_match_onnxruntime(opset: int) -> None:
    feeds = {"x": np.array([[0.5, 1.0, -4.0], [-1.5, 3.0, 0.0]], np.float32)}
    ours, theirs = _run_both(_relu_add_model(opset=opset, ir_version=8), feeds)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)


def test_old_ir_initializers_listed_as_inputs_become_constants() -> None:
    model = load(light_model_path("resnet50"))
    assert [v.name for v in model.graph.inputs] == ["gpu_0/data_0"]
    raw = onnx.load(light_model_path("resnet50"))
    assert raw.ir_version < 4 and len(raw.graph.input) > 200


def test_new_ir_initializer_inputs_stay_overridable() -> None:
    proto = _relu_add_model()
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros((2, 3), np.float32), "x"))
    model = load(proto)
    assert [v.name for v in model.graph.inputs] == ["x"]
    interpreter = ReferenceInterpreter(model)
    np.testing.assert_array_equal(interpreter.run({}).outputs["y"], [[1, 0, 3], [1, 0, 3]])
    given = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(interpreter.run({"x": given}).outputs["y"], [[2, 0, 4]] * 2)


def test_external_data_model_loads_from_its_folder(tmp_path) -> None:
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "ext.onnx"
    onnx.save(
        proto,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.bin",
        size_threshold=0,
    )
    assert (tmp_path / "ext.bin").stat().st_size == weight.nbytes
    x = np.ones((1, 64), np.float32)
    result = ReferenceInterpreter(load(path)).run({"x": x}).outputs["y"]
    np.testing.assert_allclose(result, x @ weight, rtol=1e-5)
    (tmp_path / "ext.bin").unlink()
    with pytest.raises(ModelLoadError, match="external data"):
        load(path)


def test_unsupported_ops_report_names_type_count_and_nodes() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="r"),
        helper.make_node("FancyOp", ["a"], ["b"], name="fancy_1", domain="com.example"),
        helper.make_node("FancyOp", ["b"], ["y"], name="fancy_2", domain="com.example"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    report = unsupported_ops(load(proto))
    assert len(report) == 1
    assert report[0].qualified_name == "com.example::FancyOp"
    assert report[0].count == 2 and report[0].node_names == ("fancy_1", "fancy_2")


def test_refuses_missing_file(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=r"nope\.onnx: no such file"):
        load(tmp_path / "nope.onnx")


def test_refuses_text_and_truncated_files(tmp_path) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    with pytest.raises(ModelLoadError, match="notes.onnx: not an ONNX model"):
        load(text)
    data = light_model_path("squeezenet").read_bytes()
    truncated = tmp_path / "half.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="half.onnx: not an ONNX model"):
        load(truncated)


def test_refuses_cycle_and_missing_initializer_naming_the_node() -> None:
    cyclic = helper.make_graph(
        [
            helper.make_node("Add", ["x", "b"], ["a"], name="first"),
            helper.make_node("Relu", ["a"], ["b"], name="second"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(ModelLoadError, match="cycle through nodes"):
        load(helper.make_model(cyclic, opset_imports=[helper.make_opsetid("", 17)]))
    missing = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv1.weight"], ["y"], name="conv1")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    with pytest.raises(ModelLoadError, match=r"node 'conv1' \(Conv\) reads 'conv1.weight'"):
        load(helper.make_model(missing, opset_imports=[helper.make_opsetid("", 17)]))


def test_save_is_atomic_and_round_trips(tmp_path) -> None:
    model = load(_relu_add_model())
    target = tmp_path / "saved.onnx"
    save(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.onnx"]
    assert ir.to_onnx_text(load(target)) == ir.to_onnx_text(model)
