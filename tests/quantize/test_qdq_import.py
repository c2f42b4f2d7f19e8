"""import_qdq: QDQ models (onnxruntime quantize_static and hand-made) folded into scale hints.

Oracles: the scale initializers and int8 weights of the QDQ model itself (read with onnx),
NumPy dequantization, and the float model the QDQ model was made from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine import zoo
from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load, to_proto
from engine.quantize.qdq_import import EXPLICIT_QDQ, QuantHints, has_qdq, import_qdq

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# --------------------------------------------------------------------------- onnxruntime models


def _quantize(source: Path, target: Path, feeds: list[dict[str, np.ndarray]], **options: Any):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, **options)
    return onnx.load(str(target))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = tmp_path_factory.mktemp("qdq")
    proto = zoo.build("resnet")
    onnx.save(proto, folder / "float.onnx")
    quant_pre_process(str(folder / "float.onnx"), str(folder / "pre.onnx"))
    feeds = [zoo.make_inputs(proto, seed=seed) for seed in (1, 2)]
    return {"folder": folder, "proto": proto, "feeds": feeds}


@pytest.fixture(scope="module")
def symmetric(resnet: dict[str, Any]) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType

    return _quantize(
        resnet["folder"] / "pre.onnx",
        resnet["folder"] / "symmetric.onnx",
        resnet["feeds"],
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_symmetric_int8_model_folds_every_pair(symmetric: onnx.ModelProto) -> None:
    model = load(symmetric)
    assert has_qdq(model)
    imported, hints = import_qdq(model)
    assert hints.kept == ()
    assert not has_qdq(imported)
    assert not [n for n in imported.graph if n.op_type in QDQ_OPS]
    assert {n.op_type for n in imported.graph} >= {"Conv", "Gemm"}
    assert not [v for v in imported.graph.initializers.values() if v.dtype == ir.DataType.INT8]


def test_recorded_activation_scales_are_the_models_scales(symmetric: onnx.ModelProto) -> None:
    _, hints = import_qdq(load(symmetric))
    constants = _initializers(symmetric)
    quantizers = [n for n in symmetric.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers
    assert set(hints.activation_scales) == {n.input[0] for n in quantizers}
    for node in quantizers:
        scale = constants[node.input[1]]
        assert hints.activation_scales[node.input[0]] == float(scale), node.name


def test_weights_are_the_dequantized_int8_values(symmetric: onnx.ModelProto) -> None:
    imported, hints = import_qdq(load(symmetric))
    constants = _initializers(symmetric)
    weights = 0
    for node in symmetric.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in constants:
            continue
        quantized, scale = constants[node.input[0]], constants[node.input[1]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [-1 if i == axis else 1 for i in range(quantized.ndim)]
        expected = quantized.astype(np.float32) * scale.astype(np.float32).reshape(shape)
        folded = imported.graph.initializers[node.output[0]].const_value.numpy()
        np.testing.assert_array_equal(folded, expected)
        table = hints.weight_scales if quantized.dtype == np.int8 else hints.bias_scales
        recorded, recorded_axis = table[node.output[0]]
        np.testing.assert_array_equal(recorded, scale)
        assert recorded_axis == axis
        weights += quantized.dtype == np.int8
    assert weights == len(hints.weight_scales) == 11


def test_imported_model_runs_close_to_the_float_model(
    resnet: dict[str, Any], symmetric: onnx.ModelProto
) -> None:
    imported, _ = import_qdq(load(symmetric))
    feeds = resnet["feeds"][0]
    got = ReferenceInterpreter(imported).run(feeds).outputs["output"]
    want = ReferenceInterpreter(load(resnet["proto"])).run(feeds).outputs["output"]
    cosine = np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want)
    assert cosine > 0.999  # int8 weights, float activations: close to the float model


def test_asymmetric_uint8_model_keeps_its_pairs(resnet: dict[str, Any]) -> None:
    from onnxruntime.quantization import QuantType

    proto = _quantize(
        resnet["folder"] / "pre.onnx",
        resnet["folder"] / "asymmetric.onnx",
        resnet["feeds"],
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QUInt8,
    )
    imported, hints = import_qdq(load(proto))
    remaining = [n for n in imported.graph if n.op_type in QDQ_OPS]
    constants = _initializers(proto)
    biases = [n for n in proto.graph.node if n.input and n.input[0] in constants]
    biases = [n for n in biases if constants[n.input[0]].dtype == np.int32]
    assert len(biases) == len(hints.bias_scales) == 11  # int32 biases fold, uint8 never does
    assert len(remaining) == sum(n.op_type in QDQ_OPS for n in proto.graph.node) - len(biases)
    kept = dict(hints.kept)
    for node in remaining:
        assert node.metadata_props["gie.role"] == EXPLICIT_QDQ
        assert "asymmetric" in node.metadata_props["gie.reason"]
        assert "asymmetric" in kept[node.name]
    assert hints.activation_scales == {}
    assert ReferenceInterpreter(imported).run(resnet["feeds"][0]).outputs["output"].shape == (
        1,
        10,
    )


# --------------------------------------------------------------------------- hand-made models


def _model(
    nodes: list[onnx.NodeProto],
    consts: dict[str, np.ndarray],
    outputs: list[str],
    inputs: tuple[str, ...] = ("x",),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in inputs],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _pair(
    scale: float | np.ndarray = 0.05,
    zero_point: np.ndarray | None = None,
    dq_scale: float | None = None,
    axis: int = 1,
) -> onnx.ModelProto:
    """x -> Q -> DQ -> Relu -> y."""
    zero_point = np.array(0, np.int8) if zero_point is None else zero_point
    consts = {
        "s": np.asarray(scale, np.float32),
        "zp": zero_point,
        "s2": np.asarray(scale if dq_scale is None else dq_scale, np.float32),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], "quant", axis=axis),
        helper.make_node("DequantizeLinear", ["q", "s2", "zp"], ["dq"], "dequant", axis=axis),
        helper.make_node("Relu", ["dq"], ["y"], "relu"),
    ]
    return _model(nodes, consts, ["y"])


def _kept_reasons(proto: onnx.ModelProto) -> dict[str, str]:
    imported, hints = import_qdq(load(proto))
    for node in imported.graph:
        if node.name in dict(hints.kept):
            assert node.metadata_props["gie.role"] == EXPLICIT_QDQ
            assert node.metadata_props["gie.reason"] == dict(hints.kept)[node.name]
    return dict(hints.kept)


@pytest.mark.parametrize(
    ("proto", "reason"),
    [
        (_pair(zero_point=np.array(3, np.int8)), "asymmetric (zero point 3): int8 layers are"),
        (_pair(zero_point=np.array(0, np.uint8)), "asymmetric uint8"),
        (
            _pair(np.array([0.1, 0.2, 0.3]), np.zeros(3, np.int8)),
            "per-axis activation scales (axis 1, 3 values)",
        ),
        (_pair(0.05, dq_scale=0.1), "scale 0.05 and the DequantizeLinear scale [0.1"),
        (
            _pair(zero_point=np.array(0, onnx.helper.tensor_dtype_to_np_dtype(TensorProto.INT4))),
            "int4 quantization",
        ),
    ],
)
def test_unfoldable_pairs_are_kept_with_a_reason(proto: onnx.ModelProto, reason: str) -> None:
    kept = _kept_reasons(proto)
    assert set(kept) == {"quant", "dequant"}
    assert all(reason in text for text in kept.values()), kept


def test_float8_pair_is_kept() -> None:
    zero_point = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])
    proto = _pair()
    proto.graph.initializer[1].CopyFrom(zero_point)
    kept = _kept_reasons(proto)
    assert "float8e4m3fn quantization" in kept["quant"]


def test_quantize_without_dequantize_and_dequantize_without_quantize() -> None:
    consts = {"s": np.array(0.1, np.float32), "zp": np.array(0, np.int8)}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q_out"], "q_output"),
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q2"], "q_cast"),
        helper.make_node("Cast", ["q2"], ["c"], "cast", to=TensorProto.FLOAT),
        helper.make_node("DequantizeLinear", ["q_in", "s", "zp"], ["d"], "dq_input"),
    ]
    proto = _model(nodes, consts, ["q_out", "c", "d"])
    proto.graph.input.append(helper.make_tensor_value_info("q_in", TensorProto.INT8, [2, 3]))
    kept = _kept_reasons(proto)
    assert kept["q_output"] == "its quantized output 'q_out' is a graph output"
    assert kept["q_cast"] == "no DequantizeLinear reads its output"
    assert "'q_in' comes from a graph input" in kept["dq_input"]


def test_shared_quantize_and_graph_output_dequantize_fold() -> None:
    """One Q read by two DQs (one of them a graph output): both fold, names stay."""
    consts = {"s": np.array(0.25, np.float32), "zp": np.array(0, np.int8)}
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["t"], "sigmoid"),
        helper.make_node("QuantizeLinear", ["t", "s", "zp"], ["q"], "quant"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d1"], "dq1"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["out"], "dq2"),
        helper.make_node("Neg", ["d1"], ["neg"], "neg"),
    ]
    proto = _model(nodes, consts, ["out", "neg"])
    imported, hints = import_qdq(load(proto))
    assert hints.kept == ()
    assert hints.activation_scales == {"t": 0.25}
    assert [o.name for o in imported.graph.outputs] == ["out", "neg"]
    assert sorted(n.op_type for n in imported.graph) == ["Identity", "Neg", "Sigmoid"]
    assert not imported.graph.initializers  # scale and zero point no longer used
    x = np.linspace(-3, 3, 6, dtype=np.float32).reshape(2, 3)
    outputs = ReferenceInterpreter(imported).run({"x": x}).outputs
    sigmoid = (1 / (1 + np.exp(-x.astype(np.float64)))).astype(np.float32)
    np.testing.assert_allclose(outputs["out"], sigmoid, rtol=1e-6)
    np.testing.assert_allclose(outputs["neg"], -sigmoid, rtol=1e-6)


def test_per_tensor_weight_int32_bias_and_asymmetric_weight() -> None:
    w_q = np.array([[1, -2, 3], [127, -128, 0]], np.int8)  # [N, K]
    b_q = np.array([10, -20], np.int32)
    consts = {
        "w_q": w_q,
        "w_s": np.array(0.5, np.float32),
        "b_q": b_q,
        "b_s": np.array([0.01, 0.02], np.float32),
        "u_q": np.array([[0, 255, 7]], np.uint8),
        "u_s": np.array(0.1, np.float32),
        "u_zp": np.array(7, np.uint8),
    }
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], "dq_w"),
        helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["b"], "dq_b", axis=0),
        helper.make_node("DequantizeLinear", ["u_q", "u_s", "u_zp"], ["u"], "dq_u"),
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], "gemm", transB=1),
        helper.make_node("Gemm", ["x", "u"], ["h"], "gemm_u", transB=1),
    ]
    imported, hints = import_qdq(load(_model(nodes, consts, ["g", "h"])))
    weight = imported.graph.initializers["w"].const_value.numpy()
    np.testing.assert_array_equal(weight, w_q.astype(np.float32) * np.float32(0.5))
    bias = imported.graph.initializers["b"].const_value.numpy()
    np.testing.assert_array_equal(bias, b_q.astype(np.float32) * consts["b_s"])
    scales, axis = hints.weight_scales["w"]
    assert scales.shape == () and float(scales) == 0.5 and axis is None
    assert hints.bias_scales["b"][1] == 0
    assert dict(hints.kept) == {
        "dq_u": "asymmetric uint8 (zero point 7): int8 layers are symmetric and signed"
    }
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    outputs = ReferenceInterpreter(imported).run({"x": x}).outputs
    np.testing.assert_allclose(outputs["g"], x @ weight.T + bias, rtol=1e-6)
    np.testing.assert_allclose(outputs["h"], x @ ((np.array([[0, 255, 7]]) - 7) * 0.1).T, 1e-5)


# --------------------------------------------------------------------------- the hints record


def test_hints_json_round_trip_and_summary() -> None:
    proto = _pair(zero_point=np.array(3, np.int8))
    _, kept_hints = import_qdq(load(proto))
    hints = QuantHints(
        {"t": 0.0123},
        {"w": (np.array([0.5, 0.25], np.float32), 0)},
        {"b": (np.array(0.125, np.float32), None)},
        kept_hints.kept,
    )
    restored = QuantHints.from_json(json.loads(json.dumps(hints.to_json())))
    assert restored == hints
    assert restored.weight_scales["w"][0].dtype == np.float32
    text = hints.summary()
    assert "1 activation scales" in text and "2 Q/DQ nodes kept" in text
    assert "asymmetric (zero point 3)" in text


def test_input_untouched_and_plain_models_have_no_qdq(symmetric: onnx.ModelProto) -> None:
    model = load(symmetric)
    before = to_proto(model).SerializeToString()
    import_qdq(model)
    assert to_proto(model).SerializeToString() == before
    assert not has_qdq(load(zoo.build("mobilenetv2_block")))
