"""The engine's model after precision decisions: reformat layers, int8 layers, weights, .gie files.

Small hand-built ONNX models; every build uses the reference tactic only (no timing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from engine.build.plan import Layer
from engine.builder import build
from engine.config import BuilderConfig, Precision
from engine.onnx_io import load
from engine.quantize.qparams import quantize, quantize_bias, weight_scales
from engine.runtime import Engine
from engine.serialize import load_engine, save_engine

FP32, FP16, INT8 = Precision.FP32, Precision.FP16, Precision.INT8
BASE = BuilderConfig(tactic_sources=frozenset({"reference"}))
PADS = [1, 1, 1, 1]


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "w1": (8, 3, 3, 3),
        "b1": (8,),
        "w2": (8, 8, 3, 3),
        "b2": (8,),
        "w3": (4, 8, 3, 3),
        "b3": (4,),
    }
    return {
        name: (rng.standard_normal(shape) * (0.1 if name[0] == "b" else 0.3)).astype(np.float32)
        for name, shape in shapes.items()
    }


def _model(
    nodes: list[onnx.NodeProto],
    weights: dict[str, np.ndarray],
    x_shape: list[int],
    outputs: dict[str, list[int]],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv_net() -> onnx.ModelProto:
    """conv1 -> relu1 -> conv2 -> pool (MaxPool) -> conv3."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=PADS),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=PADS),
        helper.make_node(
            "MaxPool", ["c2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Conv", ["p", "w3", "b3"], ["y"], name="conv3", pads=PADS),
    ]
    return _model(nodes, _weights(), [1, 3, 8, 8], {"y": [1, 4, 4, 4]})


def _data(n: int = 3, seed: int = 7) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _build(proto: onnx.ModelProto, data: Any = None, **changes: Any) -> Engine:
    return build(load(proto), BASE.with_changes(**changes), calibration_data=data)


def _producers(engine: Engine) -> dict[str, Layer]:
    return {out: layer for layer in engine.plan.layers for out in layer.outputs}


def _with_origin(engine: Engine, origin: str) -> Layer:
    (layer,) = [layer for layer in engine.plan.layers if origin in layer.origins]
    return layer


def _check_metadata(engine: Engine) -> None:
    for node in engine.plan.model.graph:
        assert node.metadata_props.get("gie.precision") in ("fp32", "tf32", "fp16", "int8"), node


# ---------------------------------------------------------------------------- fp16


def test_an_fp16_chain_has_casts_at_the_graph_input_and_output_only() -> None:
    engine = _build(_conv_net(), precisions=frozenset({FP32, FP16}))
    compute = [layer for layer in engine.plan.layers if layer.role == "compute"]
    reformats = [layer for layer in engine.plan.layers if layer.role == "reformat"]
    assert compute and all(layer.precision == FP16 for layer in compute)
    assert len(reformats) == 2 and all(layer.op_type == "Cast" for layer in reformats)
    first, last = engine.plan.layers[0], engine.plan.layers[-1]
    assert first in reformats and first.inputs == ("x",)
    assert engine.plan.specs[first.outputs[0]].dtype == ir.DataType.FLOAT16
    assert last in reformats and last.outputs == ("y",)
    # Between compute layers, float16 values pass directly.
    producers = _producers(engine)
    for layer in compute[1:]:
        assert producers[layer.inputs[0]].role == "compute", layer.name
        assert engine.plan.specs[layer.inputs[0]].dtype == ir.DataType.FLOAT16
    assert engine.plan.outputs == ["y"]
    assert engine.plan.specs["y"].dtype == ir.DataType.FLOAT
    out = engine.run(_data(1)[0])
    assert list(out) == ["y"] and out["y"].dtype == np.float32 and out["y"].shape == (1, 4, 4, 4)
    _check_metadata(engine)


def test_fp16_weights_replace_the_float32_ones() -> None:
    engine = _build(_conv_net(), precisions=frozenset({FP32, FP16}))
    names = set(engine.plan.model.graph.initializers)
    weights = _weights()
    for name, array in weights.items():
        assert name not in names, name
        assert f"{name}::fp16" in names
        np.testing.assert_array_equal(engine.plan.constants[f"{name}::fp16"], array.astype("f2"))


def test_a_value_read_by_two_consumers_in_the_same_format_is_converted_once() -> None:
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["a"], name="sig"),
        helper.make_node("Tanh", ["x"], ["b"], name="tanh"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    proto = _model(nodes, {}, [2, 5], {"y": [2, 5]})
    engine = _build(proto, precisions=frozenset({FP32, FP16}), optimization_level="O0")
    readers_of_x = [layer for layer in engine.plan.layers if "x" in layer.inputs]
    assert len(readers_of_x) == 1 and readers_of_x[0].op_type == "Cast"
    cast = readers_of_x[0].outputs[0]
    assert engine.plan.layer("sig").inputs == (cast,)
    assert engine.plan.layer("tanh").inputs == (cast,)
    x = np.linspace(-2, 2, 10, dtype=np.float32).reshape(2, 5)
    h = x.astype(np.float16).astype(np.float64)
    a = (1 / (1 + np.exp(-h))).astype(np.float16)
    b = np.tanh(h).astype(np.float16)
    want = (a.astype(np.float32) + b.astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(engine.run({"x": x})["y"], want.astype(np.float32))


def test_an_int8_value_read_by_two_int8_layers_is_quantized_once() -> None:
    weights = {k: v for k, v in _weights().items() if k in ("w2", "b2")}
    weights["w2b"] = weights["w2"][::-1].copy()
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["r"], name="sig"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y1"], name="conv_a", pads=PADS),
        helper.make_node("Conv", ["r", "w2b"], ["y2"], name="conv_b", pads=PADS),
    ]
    proto = _model(nodes, weights, [1, 8, 6, 6], {"y1": [1, 8, 6, 6], "y2": [1, 8, 6, 6]})
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)} for _ in range(2)]
    engine = _build(proto, data, precisions=frozenset({FP32, INT8}))
    quantizers = [layer for layer in engine.plan.layers if layer.op_type == "QuantizeLinear"]
    assert len(quantizers) == 1 and quantizers[0].inputs[0] == "r"
    q = quantizers[0].outputs[0]
    for origin in ("conv_a", "conv_b"):
        layer = _with_origin(engine, origin)
        assert layer.op_type == "QConv" and layer.inputs[0] == q
    out = engine.run(data[0])
    assert out["y1"].dtype == np.float32 and out["y2"].dtype == np.float32


# ---------------------------------------------------------------------------- int8


def test_an_int8_conv_chain_passes_int8_between_qconvs_and_float_to_maxpool() -> None:
    engine = _build(_conv_net(), _data(), precisions=frozenset({FP32, INT8}))
    producers = _producers(engine)
    qconv1, qconv2 = _with_origin(engine, "conv1"), _with_origin(engine, "conv2")
    pool, qconv3 = _with_origin(engine, "pool"), _with_origin(engine, "conv3")
    for layer in (qconv1, qconv2, qconv3):
        assert (layer.domain, layer.op_type, layer.precision) == ("gie", "QConv", INT8)
    assert pool.precision == FP32
    # x is quantized right before the first QConv.
    quantize_x = producers[qconv1.inputs[0]]
    assert quantize_x.op_type == "QuantizeLinear" and quantize_x.role == "reformat"
    assert quantize_x.inputs[0] == "x"
    # conv1 -> conv2: int8 directly, no DQ/Q in between.
    assert producers[qconv2.inputs[0]] is qconv1
    assert engine.plan.specs[qconv2.inputs[0]].dtype == ir.DataType.INT8
    assert qconv1.attrs.int("output_dtype", 0) == int(ir.DataType.INT8)
    # MaxPool reads float32: conv2 writes float or a DequantizeLinear converts its output.
    pool_input = producers[pool.inputs[0]]
    assert engine.plan.specs[pool.inputs[0]].dtype == ir.DataType.FLOAT
    assert pool_input is qconv2 or pool_input.op_type == "DequantizeLinear"
    assert producers[qconv3.inputs[0]].op_type == "QuantizeLinear"
    names = [layer.name for layer in engine.plan.layers]
    assert names.index(quantize_x.name) < names.index(qconv1.name)
    # The graph output stays float32 named y.
    assert engine.plan.outputs == ["y"] and engine.run(_data(1)[0])["y"].dtype == np.float32
    _check_metadata(engine)


def test_int8_weights_bias_and_scales_follow_the_int8_contract() -> None:
    engine = _build(_conv_net(), _data(), precisions=frozenset({FP32, INT8}))
    weights, constants = _weights(), engine.plan.constants
    for i in (1, 2, 3):
        layer = _with_origin(engine, f"conv{i}")
        _, x_scale_name, w_name, ws_name, b_name = layer.inputs[:5]
        w, b = weights[f"w{i}"], weights[f"b{i}"]
        want_ws = weight_scales(w, axis=0)
        np.testing.assert_array_equal(want_ws, np.abs(w).reshape(w.shape[0], -1).max(1) / 127)
        np.testing.assert_array_equal(constants[ws_name], want_ws)
        assert constants[w_name].dtype == np.int8
        np.testing.assert_array_equal(constants[w_name], quantize(w, want_ws, axis=0))
        x_scale = constants[x_scale_name]
        assert x_scale.dtype == np.float32 and x_scale.shape == ()
        origin_input = {1: "x", 2: "r1", 3: "p"}[i]
        assert float(x_scale) == np.float32(engine.quant_scales.scale(origin_input))
        assert constants[b_name].dtype == np.int32
        np.testing.assert_array_equal(constants[b_name], quantize_bias(b, x_scale, want_ws))


def test_float_weights_replaced_by_int8_copies_leave_the_model() -> None:
    engine = _build(_conv_net(), _data(), precisions=frozenset({FP32, INT8}))
    names = set(engine.plan.model.graph.initializers)
    assert not names & set(_weights()), names & set(_weights())
    assert not set(engine.plan.constants) & set(_weights())


def test_a_weight_shared_with_an_fp32_layer_stays() -> None:
    w = _weights()["w2"]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a", pads=PADS),
        helper.make_node("Conv", ["a", "w"], ["y"], name="conv_b", pads=PADS),
    ]
    proto = _model(nodes, {"w": w}, [1, 8, 5, 5], {"y": [1, 8, 5, 5]})
    engine = _build(proto, layer_precisions=(("conv_a", FP16),))
    assert _with_origin(engine, "conv_b").precision == FP32
    names = set(engine.plan.model.graph.initializers)
    assert {"w", "w::fp16"} <= names
    _check_metadata(engine)


# ---------------------------------------------------------------------------- .gie files


def test_a_saved_engine_keeps_precisions_roles_reasons_and_outputs(tmp_path: Path) -> None:
    engine = _build(
        _conv_net(),
        _data(),
        precisions=frozenset({FP32, FP16, INT8}),
        layer_precisions=(("pool", INT8),),
    )
    rows = [(lay.name, lay.precision, lay.role, lay.precision_reason) for lay in engine.plan.layers]
    assert {"compute", "reformat"} <= {role for _, _, role, _ in rows}
    assert any("no int8 kernel for MaxPool" in reason for *_, reason in rows)
    assert {precision for _, precision, _, _ in rows} >= {FP16, INT8}
    path = save_engine(engine, tmp_path / "mixed.gie")
    loaded = load_engine(path)
    assert [
        (lay.name, lay.precision, lay.role, lay.precision_reason) for lay in loaded.plan.layers
    ] == rows
    _check_metadata(loaded)
    for feeds in _data(2, seed=11):
        want, got = engine.run(feeds), loaded.run(feeds)
        assert want.keys() == got.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype
            np.testing.assert_array_equal(got[name], want[name])


def test_int8_gemm_and_matmul_layers_follow_the_int8_contract() -> None:
    rng = np.random.default_rng(0)
    wg = (rng.standard_normal((6, 16)) * 0.3).astype(np.float32)  # transB=1: [N, K]
    bg = (rng.standard_normal(6) * 0.1).astype(np.float32)
    wm = (rng.standard_normal((6, 5)) * 0.3).astype(np.float32)  # MatMul weight: [K, N]
    nodes = [
        helper.make_node("Gemm", ["x", "wg", "bg"], ["g"], name="gemm", transB=1),
        helper.make_node("Relu", ["g"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "wm"], ["y"], name="mm"),
    ]
    proto = _model(nodes, {"wg": wg, "bg": bg, "wm": wm}, [4, 16], {"y": [4, 5]})
    data = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(3)]
    engine = _build(proto, data, precisions=frozenset({FP32, INT8}))
    gemm, mm = _with_origin(engine, "gemm"), _with_origin(engine, "mm")
    assert (gemm.op_type, mm.op_type) == ("QGemm", "QGemm")
    c = engine.plan.constants
    s_x, s_r = np.float32(c[gemm.inputs[1]]), np.float32(c[mm.inputs[1]])
    assert s_x == np.float32(engine.quant_scales.scale("x"))
    assert s_r == np.float32(engine.quant_scales.scale("r"))
    ws_g, ws_m = weight_scales(wg, axis=0), weight_scales(wm, axis=1)
    assert ws_g.shape == (6,) and ws_m.shape == (5,)
    np.testing.assert_array_equal(c[gemm.inputs[3]], ws_g)
    np.testing.assert_array_equal(c[gemm.inputs[2]], quantize(wg, ws_g, axis=0))
    np.testing.assert_array_equal(c[gemm.inputs[4]], quantize_bias(bg, s_x, ws_g))
    np.testing.assert_array_equal(c[mm.inputs[3]], ws_m)
    np.testing.assert_array_equal(c[mm.inputs[2]], quantize(wm, ws_m, axis=1))
    # gemm -> mm passes int8 directly.
    assert mm.inputs[0] == gemm.outputs[0] and gemm.inputs[6] == mm.inputs[1]
    # The whole int8 computation by the contract, in NumPy.
    x = data[0]["x"]
    acc = quantize(x, s_x).astype(np.float64) @ quantize(wg, ws_g, axis=0).astype(np.float64).T
    acc += quantize_bias(bg, s_x, ws_g)
    real = np.maximum(acc.astype(np.float32) * (s_x * ws_g), np.float32(0))
    r_q = quantize(real, s_r)
    acc2 = r_q.astype(np.float64) @ quantize(wm, ws_m, axis=1).astype(np.float64)
    want = acc2.astype(np.float32) * (s_r * ws_m)
    np.testing.assert_array_equal(engine.run(data[0])["y"], want)


def test_int8_build_of_a_model_without_value_types_quantizes_every_int8_input() -> None:
    """A model straight from onnx-ir (no engine.onnx_io.load, so no value types) still gets a
    QuantizeLinear before every int8 layer whose input a float layer produces."""
    from engine import zoo

    proto = zoo.build("resnet")
    calibration = [zoo.make_inputs(proto, seed=s) for s in range(2)]
    config = BuilderConfig(
        precisions=frozenset({Precision.FP32, Precision.INT8}),
        tactic_sources=frozenset({"reference"}),
    )
    engine = build(ir.serde.deserialize_model(proto), config, calibration_data=calibration)
    for layer in engine.plan.layers:
        if layer.op_type in ("QConv", "QGemm"):
            assert engine.plan.specs[layer.inputs[0]].dtype == ir.DataType.INT8, layer.name
    assert np.isfinite(engine.run(calibration[0])["output"]).all()
