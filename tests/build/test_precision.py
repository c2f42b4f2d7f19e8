"""Precision semantics of the builder: enabled order, per-layer requests, fallbacks, fp16 checks.

Small hand-built ONNX models; every build uses the reference tactic only (no timing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.build.plan import Layer
from engine.builder import BuildError, build
from engine.config import BuilderConfig, Precision, PrecisionMode
from engine.onnx_io import load
from engine.runtime import Engine

FP32, TF32, FP16, INT8 = Precision.FP32, Precision.TF32, Precision.FP16, Precision.INT8
BASE = BuilderConfig(tactic_sources=frozenset({"reference"}))


def _weight(name: str, shape: tuple[int, ...], seed: int, scale: float = 0.3) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    x_shape: list[int | str],
    y_shape: list[int | str] | None,
    y_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", y_type, y_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv_net() -> onnx.ModelProto:
    """conv1 -> relu1 -> conv2 -> pool (MaxPool) -> conv3 on a [1, 3, 8, 8] input."""
    inits = [
        _weight("w1", (8, 3, 3, 3), 1),
        _weight("b1", (8,), 2, 0.1),
        _weight("w2", (8, 8, 3, 3), 3),
        _weight("b2", (8,), 4, 0.1),
        _weight("w3", (4, 8, 3, 3), 5),
        _weight("b3", (4,), 6, 0.1),
    ]
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=pads),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=pads),
        helper.make_node(
            "MaxPool", ["c2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Conv", ["p", "w3", "b3"], ["y"], name="conv3", pads=pads),
    ]
    return _model(nodes, inits, [1, 3, 8, 8], [1, 4, 4, 4])


def _calibration(n: int = 3, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": (rng.standard_normal((1, 3, 8, 8)) * scale).astype(np.float32)} for _ in range(n)]


def _build(proto: onnx.ModelProto, calibration_data: Any = None, **changes: Any) -> Engine:
    return build(load(proto), BASE.with_changes(**changes), calibration_data=calibration_data)


def _compute(engine: Engine) -> dict[str, tuple[str, Precision, str]]:
    """Compute layers: name -> (qualified op, precision, reason)."""
    return {
        layer.name: (layer.qualified_op, layer.precision, layer.precision_reason)
        for layer in engine.plan.layers
        if layer.role == "compute"
    }


def _layer_with_origin(engine: Engine, origin: str) -> Layer:
    matches = [layer for layer in engine.plan.layers if origin in layer.origins]
    assert len(matches) == 1, [(layer.name, layer.origins) for layer in engine.plan.layers]
    return matches[0]


# ---------------------------------------------------------------------------- enabled order


def test_each_layer_takes_the_narrowest_enabled_precision_it_supports() -> None:
    proto, data = _conv_net(), _calibration()
    all_enabled = _build(proto, data, precisions=frozenset({FP32, TF32, FP16, INT8}))
    convs = [_layer_with_origin(all_enabled, name) for name in ("conv1", "conv2", "conv3")]
    assert all(lay.precision == INT8 for lay in convs)
    # MaxPool has no int8 kernel: next enabled precision is fp16.
    assert _layer_with_origin(all_enabled, "pool").precision == FP16

    no_int8 = _build(proto, data, precisions=frozenset({FP32, TF32, FP16}))
    assert {p for _, p, _ in _compute(no_int8).values()} == {FP16}

    tf32_only = _build(proto, precisions=frozenset({FP32, TF32}))
    for op, precision, _ in _compute(tf32_only).values():
        # tf32 changes convolutions only; MaxPool stays fp32.
        assert precision == (TF32 if "Conv" in op else FP32), (op, precision)

    fp32_only = _build(proto)
    assert {p for _, p, _ in _compute(fp32_only).values()} == {FP32}
    assert not [lay for lay in fp32_only.plan.layers if lay.role != "compute"]


# ---------------------------------------------------------------------------- requests


def test_a_request_by_exact_name_or_glob_enables_that_precision_for_the_layer() -> None:
    proto = _conv_net()
    by_name = _build(proto, layer_precisions=(("pool", FP16),))
    layers = _compute(by_name)
    assert layers["pool"][1] == FP16
    assert all(p == FP32 for name, (_, p, _) in layers.items() if name != "pool")

    by_glob = _build(proto, layer_precisions=(("conv*", TF32),))
    pool = _layer_with_origin(by_glob, "pool")
    assert pool.precision == FP32
    conv2 = _layer_with_origin(by_glob, "conv2")
    assert conv2.name.startswith("conv2") and conv2.precision == TF32
    conv3 = _layer_with_origin(by_glob, "conv3")
    assert conv3.precision == TF32


def test_the_last_matching_request_wins() -> None:
    proto = _conv_net()
    engine = _build(proto, layer_precisions=(("*", FP16), ("pool", TF32), ("p*", FP32)))
    assert _layer_with_origin(engine, "pool").precision == FP32
    assert _layer_with_origin(engine, "conv3").precision == FP16
    engine = _build(proto, layer_precisions=(("p*", FP32), ("*", FP16)))
    assert _layer_with_origin(engine, "pool").precision == FP16


def test_a_request_on_an_origin_node_reaches_the_fused_layer() -> None:
    engine = _build(_conv_net(), layer_precisions=(("relu1", FP16),))
    fused = _layer_with_origin(engine, "relu1")
    assert fused.op_type == "ConvAct" and "conv1" in fused.origins  # Relu fused at O2
    assert fused.precision == FP16
    assert _layer_with_origin(engine, "conv2").precision == FP32


def test_conflicting_own_and_origin_requests_are_logged_as_lost() -> None:
    probe = _build(_conv_net())
    fused = _layer_with_origin(probe, "conv1").name
    assert fused not in ("conv1",)
    engine = _build(_conv_net(), layer_precisions=(("conv1", FP16), (fused, TF32)))
    layer = engine.plan.layer(fused)
    assert layer.precision == TF32  # the layer's own name wins over its origin
    notes = [e.message for e in engine.log.for_layer(fused)]
    assert any("conv1" in m and "lost" in m and "fused" in m for m in notes), notes


def test_conflicting_origin_requests_are_logged_and_the_last_one_wins() -> None:
    engine = _build(_conv_net(), layer_precisions=(("conv1", FP16), ("relu1", TF32)))
    fused = _layer_with_origin(engine, "relu1")
    assert fused.precision == TF32
    notes = " ".join(e.message for e in engine.log.for_layer(fused.name))
    assert "conv1 (fp16)" in notes and "relu1 (tf32)" in notes, notes


def test_conflicting_origin_requests_follow_the_request_order_not_the_origin_order() -> None:
    engine = _build(_conv_net(), layer_precisions=(("relu1", TF32), ("conv1", FP16)))
    assert _layer_with_origin(engine, "relu1").precision == FP16  # ("conv1", FP16) is last


# ---------------------------------------------------------------------------- refusals


def test_prefer_mode_falls_back_with_the_reason_when_an_op_has_no_int8_kernel() -> None:
    engine = _build(
        _conv_net(),
        _calibration(),
        precisions=frozenset({FP32, FP16}),
        layer_precisions=(("pool", INT8),),
    )
    pool = _layer_with_origin(engine, "pool")
    assert pool.precision == FP16  # next enabled precision after int8
    assert "no int8 kernel for MaxPool" in pool.precision_reason
    assert any(
        "no int8 kernel for MaxPool" in e.message for e in engine.log.for_layer(pool.name)
    ), engine.log.lines()


def test_prefer_mode_falls_back_when_int8_has_no_calibration_scale() -> None:
    engine = _build(_conv_net(), layer_precisions=(("conv2", INT8),))
    conv2 = _layer_with_origin(engine, "conv2")
    assert conv2.precision == FP32
    assert "no int8 scale" in conv2.precision_reason
    assert any("no int8 scale" in line and conv2.name in line for line in engine.log.lines())


def test_obey_mode_raises_naming_the_layer() -> None:
    with pytest.raises(BuildError, match=r"pool.*no int8 kernel for MaxPool"):
        _build(
            _conv_net(),
            _calibration(),
            layer_precisions=(("pool", INT8),),
            precision_mode=PrecisionMode.OBEY,
        )
    with pytest.raises(BuildError, match=r"conv2.*no int8 scale"):
        _build(_conv_net(), layer_precisions=(("conv2", INT8),), precision_mode=PrecisionMode.OBEY)


# ---------------------------------------------------------------------------- float layers only


def _shape_model() -> onnx.ModelProto:
    """y = Reshape(Relu(x), [Gather(Shape(x), 0), -1]) on x [N, 4, 2] with a dynamic N."""
    inits = [
        numpy_helper.from_array(np.array([0], dtype=np.int64), "idx"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one"),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "idx"], ["n"], name="gather", axis=0),
        helper.make_node("Concat", ["n", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["r", "target"], ["y"], name="reshape"),
    ]
    return _model(nodes, inits, ["N", 4, 2], ["N", 8])


def test_integer_and_shape_layers_stay_fp32_without_reformats() -> None:
    # O0: the optimizer would fold the shape arithmetic away.
    engine = _build(_shape_model(), precisions=frozenset({FP32, FP16}), optimization_level="O0")
    layers = {layer.name: layer for layer in engine.plan.layers}
    for name in ("shape", "gather", "concat"):
        assert layers[name].precision == FP32, name
        assert layers[name].precision_reason == "", name
    assert layers["relu"].precision == FP16
    int_values = {"s", "n", "target", "idx", "minus_one"}
    for layer in engine.plan.layers:
        if layer.role == "reformat":
            assert not int_values & set(layer.inputs), layer
    # Shape reads no data: it takes the fp16 value directly, without a Cast.
    assert layers["shape"].inputs == layers["relu"].outputs
    x = np.random.default_rng(0).standard_normal((3, 4, 2)).astype(np.float32)
    y = engine.run({"x": x})["y"]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.maximum(x.astype(np.float16), 0).reshape(3, 8))


def _matmul_softmax_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Softmax", ["h"], ["s"], name="softmax", axis=-1),
        helper.make_node("Relu", ["s"], ["y"], name="relu"),
    ]
    return _model(nodes, [_weight("w", (16, 8), 0)], [2, 16], [2, 8])


def test_tf32_only_changes_convolutions_and_matrix_products() -> None:
    engine = _build(_matmul_softmax_model(), precisions=frozenset({FP32, TF32}))
    assert _layer_with_origin(engine, "mm").precision == TF32
    assert _layer_with_origin(engine, "softmax").precision == FP32
    assert _layer_with_origin(engine, "relu").precision == FP32
    requested = _build(_matmul_softmax_model(), layer_precisions=(("softmax", TF32),))
    softmax = _layer_with_origin(requested, "softmax")
    assert softmax.precision == FP32
    assert "tf32 only changes convolutions and matrix products" in softmax.precision_reason


# ---------------------------------------------------------------------------- fp16 overflow


def _overflow_weight_model() -> onnx.ModelProto:
    w = _weight("w", (8, 4), 0)
    big = numpy_helper.to_array(w).copy()
    big[2, 3] = 1.0e5
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Softmax", ["h"], ["y"], name="softmax", axis=-1),
    ]
    return _model(nodes, [numpy_helper.from_array(big, "w")], [2, 8], [2, 4])


def test_an_fp16_overflowing_weight_keeps_its_layer_fp32() -> None:
    engine = _build(_overflow_weight_model(), precisions=frozenset({FP32, FP16}))
    mm = _layer_with_origin(engine, "mm")
    assert mm.precision == FP32
    assert "overflows fp16" in mm.precision_reason and "65504" in mm.precision_reason
    assert _layer_with_origin(engine, "softmax").precision == FP16
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    assert np.all(np.isfinite(engine.run({"x": x})["y"]))


def _activation_overflow_model() -> onnx.ModelProto:
    """y = Relu(x * 1000): the weight fits fp16, the product does not for |x| > 65.5."""
    k = numpy_helper.from_array(np.full((4,), 1000.0, dtype=np.float32), "k")
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["m"], name="scale"),
        helper.make_node("Relu", ["m"], ["y"], name="relu"),
    ]
    return _model(nodes, [k], [2, 4], [2, 4])


def test_fp16_activation_overflow_on_calibration_data_keeps_the_layer_fp32() -> None:
    rng = np.random.default_rng(3)
    data = [{"x": (rng.standard_normal((2, 4)) * 100).astype(np.float32)} for _ in range(2)]
    assert max(np.abs(d["x"]).max() for d in data) * 1000 > 65504
    fp16 = frozenset({FP32, FP16})
    guarded = _build(_activation_overflow_model(), data, precisions=fp16)
    scale = _layer_with_origin(guarded, "scale")
    assert scale.precision == FP32
    assert "overflows fp16 on the calibration data" in scale.precision_reason
    unguarded = _build(
        _activation_overflow_model(), data, precisions=fp16, fp16_overflow_fallback=False
    )
    assert _layer_with_origin(unguarded, "scale").precision == FP16
    with pytest.warns(RuntimeWarning, match="overflow"):
        y = unguarded.run(data[0])["y"]
    assert np.isinf(y).any()  # what the guard protects against
    assert np.all(np.isfinite(guarded.run(data[0])["y"]))


def test_cast_layers_are_not_turned_fp16() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["h"], name="to_half", to=TensorProto.FLOAT16),
        helper.make_node("Sigmoid", ["h"], ["s"], name="sigmoid"),
        helper.make_node("Cast", ["s"], ["y"], name="to_float", to=TensorProto.FLOAT),
    ]
    engine = _build(
        _model(nodes, [], [2, 4], [2, 4]),
        precisions=frozenset({FP32, FP16}),
        optimization_level="O0",
    )
    casts = [lay for lay in engine.plan.layers if lay.role == "compute" and lay.op_type == "Cast"]
    assert {lay.name for lay in casts} == {"to_half", "to_float"}
    assert all(lay.precision == FP32 for lay in casts)
    requested = _build(
        _model(nodes, [], [2, 4], [2, 4]),
        layer_precisions=(("to_*", FP16),),
        optimization_level="O0",
    )
    cast = requested.plan.layer("to_float")
    assert cast.precision == FP32 and "fixes its output type" in cast.precision_reason
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)
    y = engine.run({"x": x})["y"]
    assert y.dtype == np.float32
    want = (1 / (1 + np.exp(-x.astype(np.float16).astype(np.float64)))).astype(np.float16)
    np.testing.assert_array_equal(y, want.astype(np.float32))


def test_an_fp32_request_keeps_one_layer_fp32_inside_an_fp16_build() -> None:
    engine = _build(
        _conv_net(), precisions=frozenset({FP32, FP16}), layer_precisions=(("pool", FP32),)
    )
    pool = _layer_with_origin(engine, "pool")
    assert pool.precision == FP32 and pool.precision_reason == ""
    producers = {out: layer for layer in engine.plan.layers for out in layer.outputs}
    before = producers[pool.inputs[0]]
    assert before.role == "reformat" and before.op_type == "Cast"
    after = [layer for layer in engine.plan.layers if pool.outputs[0] in layer.inputs]
    assert len(after) == 1 and after[0].role == "reformat" and after[0].op_type == "Cast"
    assert all(
        layer.precision == FP16
        for layer in engine.plan.layers
        if layer.role == "compute" and layer is not pool
    )


def test_obey_mode_refuses_an_fp16_request_on_an_overflowing_weight() -> None:
    with pytest.raises(BuildError, match=r"mm.*overflows fp16"):
        _build(
            _overflow_weight_model(),
            layer_precisions=(("mm", FP16),),
            precision_mode=PrecisionMode.OBEY,
        )
