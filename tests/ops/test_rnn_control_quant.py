"""Recurrent, control-flow, sequence and quantization kernels checked against onnxruntime."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engine.backends.numpy_ref.interpreter import NodeExecutionError, ReferenceInterpreter
from engine.onnx_io import load
from engine.ops.registry import default_registry

OPSET = 21
RNG = np.random.default_rng(1234)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    opset: int = OPSET,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _ours(model: onnx.ModelProto, feeds: dict[str, Any]) -> list[Any]:
    interpreter = ReferenceInterpreter(load(model))
    outputs = interpreter.run(feeds).outputs
    return [outputs[o.name] for o in model.graph.output]


def _theirs(model: onnx.ModelProto, feeds: dict[str, Any]) -> list[Any]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _compare(model: onnx.ModelProto, feeds: dict[str, Any], atol: float = 1e-5) -> None:
    for ours, theirs in zip(_ours(model, feeds), _theirs(model, feeds), strict=True):
        assert ours.dtype == theirs.dtype
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=atol)


def _need(*ops: str) -> None:
    registry = default_registry()
    missing = [op for op in ops if registry.lookup(op) is None]
    if missing:
        pytest.skip(f"body ops not registered yet: {missing}")


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _vi(name: str, dtype: int, shape: list[Any] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


# --------------------------------------------------------------------------- recurrent


def _recurrent_case(op: str, direction: str, attrs: dict[str, Any], peepholes: bool = False):
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    seq, batch, size, hidden = 5, 3, 4, 6
    dirs = 2 if direction == "bidirectional" else 1
    feeds = {
        "X": _f32(seq, batch, size),
        "W": _f32(dirs, gates * hidden, size),
        "R": _f32(dirs, gates * hidden, hidden),
        "B": _f32(dirs, 2 * gates * hidden),
        "L": np.array([5, 2, 4], np.int32),
        "H0": _f32(dirs, batch, hidden),
    }
    names = ["X", "W", "R", "B", "L", "H0"]
    if op == "LSTM":
        feeds["C0"] = _f32(dirs, batch, hidden)
        names.append("C0")
        if peepholes:
            feeds["P"] = _f32(dirs, 3 * hidden)
            names.append("P")
    outputs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(op, names, outputs, direction=direction, hidden_size=hidden, **attrs)
    inputs = [
        _vi(n, TensorProto.INT32 if n == "L" else TensorProto.FLOAT, list(v.shape))
        for n, v in feeds.items()
    ]
    model = _model([node], inputs, [_vi(o, TensorProto.FLOAT, None) for o in outputs])
    return model, feeds


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_matches_onnxruntime(op: str, direction: str) -> None:
    model, feeds = _recurrent_case(op, direction, {}, peepholes=True)
    _compare(model, feeds)


@pytest.mark.parametrize(
    ("op", "attrs"),
    [
        ("GRU", {"linear_before_reset": 1}),
        ("LSTM", {"clip": 0.7}),
        ("LSTM", {"input_forget": 1}),
        (
            "LSTM",
            {
                "activations": ["HardSigmoid", "Tanh", "Softsign"],
                "activation_alpha": [0.3],
                "activation_beta": [0.4],
            },
        ),
        ("RNN", {"activations": ["Relu"]}),
        ("GRU", {"activations": ["Sigmoid", "LeakyRelu"], "activation_alpha": [0.2]}),
    ],
)
def test_recurrent_options_match_onnxruntime(op: str, attrs: dict[str, Any]) -> None:
    model, feeds = _recurrent_case(op, "forward", attrs)
    _compare(model, feeds)


def test_lstm_layout1_is_transposed_layout0() -> None:
    model, feeds = _recurrent_case("LSTM", "bidirectional", {})
    expected = _ours(model, feeds)
    batch_first = dict(feeds)
    for name in ("X", "H0", "C0"):
        batch_first[name] = np.ascontiguousarray(np.swapaxes(feeds[name], 0, 1))
    node = model.graph.node[0]
    node.attribute.append(helper.make_attribute("layout", 1))
    for value in model.graph.input:
        if value.name in batch_first:
            value.type.tensor_type.ClearField("shape")
    y, y_h, y_c = _ours(model, batch_first)
    np.testing.assert_allclose(y, np.transpose(expected[0], (2, 0, 1, 3)), rtol=1e-6)
    np.testing.assert_allclose(y_h, np.swapaxes(expected[1], 0, 1), rtol=1e-6)
    np.testing.assert_allclose(y_c, np.swapaxes(expected[2], 0, 1), rtol=1e-6)


def test_recurrent_direction_mismatch_is_a_clear_error() -> None:
    model, feeds = _recurrent_case("GRU", "forward", {})
    feeds["W"] = np.concatenate([feeds["W"], feeds["W"]])
    for value in model.graph.input:
        value.type.tensor_type.ClearField("shape")
    with pytest.raises(NodeExecutionError, match="direction 'forward' does not match"):
        _ours(model, feeds)


# --------------------------------------------------------------------------- control flow


def _loop_model() -> onnx.ModelProto:
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "x"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Mul", ["acc_out", "acc_out"], ["square"]),
        ],
        "body",
        [
            _vi("i", TensorProto.INT64, []),
            _vi("cond_in", TensorProto.BOOL, []),
            _vi("acc_in", TensorProto.FLOAT, [2]),
        ],
        [
            _vi("cond_out", TensorProto.BOOL, []),
            _vi("acc_out", TensorProto.FLOAT, [2]),
            _vi("square", TensorProto.FLOAT, [2]),
        ],
    )
    node = helper.make_node("Loop", ["M", "cond", "acc0"], ["acc", "squares"], body=body)
    return _model(
        [node],
        [
            _vi("M", TensorProto.INT64, []),
            _vi("cond", TensorProto.BOOL, []),
            _vi("acc0", TensorProto.FLOAT, [2]),
            _vi("x", TensorProto.FLOAT, [2]),
        ],
        [_vi("acc", TensorProto.FLOAT, [2]), _vi("squares", TensorProto.FLOAT, [None, 2])],
    )


@pytest.mark.parametrize("trips", [0, 1, 4])
def test_loop_matches_onnxruntime(trips: int) -> None:
    _need("Add", "Identity", "Mul")
    feeds = {
        "M": np.array(trips, np.int64),
        "cond": np.array(True),
        "acc0": _f32(2),
        "x": _f32(2),
    }
    model = _loop_model()
    _compare(model, feeds)
    assert _ours(model, feeds)[1].shape == (trips, 2)


def test_if_matches_onnxruntime() -> None:
    _need("Add", "Mul")

    def branch(op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["r"])], op, [], [_vi("r", TensorProto.FLOAT, [3])]
        )

    node = helper.make_node(
        "If", ["c"], ["out"], then_branch=branch("Add"), else_branch=branch("Mul")
    )
    model = _model(
        [node],
        [
            _vi("c", TensorProto.BOOL, []),
            _vi("a", TensorProto.FLOAT, [3]),
            _vi("b", TensorProto.FLOAT, [3]),
        ],
        [_vi("out", TensorProto.FLOAT, [3])],
    )
    for flag in (True, False):
        _compare(model, {"c": np.array(flag), "a": _f32(3), "b": _f32(3)})


def test_scan_reverse_and_axes_match_onnxruntime() -> None:
    _need("Add", "Identity")
    body = helper.make_graph(
        [
            helper.make_node("Add", ["s_in", "x_t"], ["s_out"]),
            helper.make_node("Identity", ["s_out"], ["y_t"]),
        ],
        "body",
        [_vi("s_in", TensorProto.FLOAT, [3]), _vi("x_t", TensorProto.FLOAT, [3])],
        [_vi("s_out", TensorProto.FLOAT, [3]), _vi("y_t", TensorProto.FLOAT, [3])],
    )
    node = helper.make_node(
        "Scan",
        ["s0", "xs"],
        ["s", "ys"],
        body=body,
        num_scan_inputs=1,
        scan_input_axes=[1],
        scan_input_directions=[1],
        scan_output_axes=[1],
        scan_output_directions=[1],
    )
    model = _model(
        [node],
        [_vi("s0", TensorProto.FLOAT, [3]), _vi("xs", TensorProto.FLOAT, [3, 4])],
        [_vi("s", TensorProto.FLOAT, [3]), _vi("ys", TensorProto.FLOAT, [3, 4])],
    )
    _compare(model, {"s0": _f32(3), "xs": _f32(3, 4)})


def test_sequence_round_trip_and_out_of_range_error() -> None:
    x = _f32(6, 2)
    nodes = [
        helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=0),
        helper.make_node("SequenceErase", ["seq"], ["short"]),
        helper.make_node("ConcatFromSequence", ["short"], ["y"], axis=0),
        helper.make_node("SequenceLength", ["short"], ["n"]),
        helper.make_node("SequenceAt", ["short", "pos"], ["item"]),
    ]
    model = _model(
        nodes,
        [
            _vi("x", TensorProto.FLOAT, [6, 2]),
            _vi("split", TensorProto.INT64, [3]),
            _vi("pos", TensorProto.INT64, []),
        ],
        [
            _vi("y", TensorProto.FLOAT, None),
            _vi("n", TensorProto.INT64, []),
            _vi("item", TensorProto.FLOAT, None),
        ],
    )
    feeds = {"x": x, "split": np.array([1, 2, 3], np.int64), "pos": np.array(-1, np.int64)}
    _compare(model, feeds)
    feeds["pos"] = np.array(2, np.int64)
    with pytest.raises(NodeExecutionError, match="position 2 is out of range"):
        _ours(model, feeds)


# --------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("zp_type", [TensorProto.UINT8, TensorProto.INT8, TensorProto.INT16])
@pytest.mark.parametrize("per_axis", [False, True])
def test_quantize_dequantize_match_onnxruntime(zp_type: int, per_axis: bool) -> None:
    np_type = helper.tensor_dtype_to_np_dtype(zp_type)
    shape = [2, 3, 4]
    count = 3 if per_axis else 1
    scale = RNG.uniform(0.01, 0.1, count).astype(np.float32)
    info = np.iinfo(np_type)
    zero = RNG.integers(info.min // 4, info.max // 4, count).astype(np_type)
    if not per_axis:
        scale, zero = scale.reshape(()), zero.reshape(())
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], axis=1),
    ]
    init = [
        onnx.numpy_helper.from_array(scale, "s"),
        onnx.numpy_helper.from_array(zero, "z"),
    ]
    model = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, shape)],
        [_vi("q", zp_type, shape), _vi("d", TensorProto.FLOAT, shape)],
        init,
    )
    x = (RNG.standard_normal(shape) * 20).astype(np.float32)
    x.flat[:4] = np.array([0.5, 1.5, 2.5, -2.5], np.float32) * scale.reshape(-1)[0]
    _compare(model, {"x": x})


def test_quantize_rounds_half_to_even_and_saturates() -> None:
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    init = [
        onnx.numpy_helper.from_array(np.array(1.0, np.float32), "s"),
        onnx.numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    model = _model(
        [node], [_vi("x", TensorProto.FLOAT, [6])], [_vi("q", TensorProto.INT8, [6])], init
    )
    x = np.array([0.5, 1.5, 2.5, -0.5, 300.0, -300.0], np.float32)
    (q,) = _ours(model, {"x": x})
    np.testing.assert_array_equal(q, np.array([0, 2, 2, 0, 127, -128], np.int8))


def test_quantize_per_axis_scale_mismatch_is_a_clear_error() -> None:
    node = helper.make_node("QuantizeLinear", ["x", "s"], ["q"], axis=1)
    model = _model(
        [node],
        [_vi("x", TensorProto.FLOAT, [2, 3]), _vi("s", TensorProto.FLOAT, [4])],
        [_vi("q", TensorProto.UINT8, [2, 3])],
    )
    with pytest.raises(NodeExecutionError, match="does not match axis 1"):
        _ours(model, {"x": _f32(2, 3), "s": np.ones(4, np.float32)})


def test_dynamic_quantize_matches_onnxruntime() -> None:
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    model = _model(
        [node],
        [_vi("x", TensorProto.FLOAT, [3, 5])],
        [
            _vi("y", TensorProto.UINT8, [3, 5]),
            _vi("s", TensorProto.FLOAT, []),
            _vi("z", TensorProto.UINT8, []),
        ],
    )
    _compare(model, {"x": _f32(3, 5) * 4})


def test_integer_matmul_and_conv_match_onnxruntime() -> None:
    a = RNG.integers(0, 255, (2, 4, 6)).astype(np.uint8)
    b = RNG.integers(-128, 127, (6, 5)).astype(np.int8)
    w = RNG.integers(-128, 127, (4, 2, 3, 3)).astype(np.int8)
    x = RNG.integers(0, 255, (1, 2, 7, 6)).astype(np.uint8)
    scalars = {
        "az": np.array(7, np.uint8),
        "bz": np.array(3, np.int8),
        "as": np.array(0.02, np.float32),
        "bs": np.array(0.03, np.float32),
        "ys": np.array(0.5, np.float32),
        "yz": np.array(100, np.uint8),
        "ws": np.array([0.01, 0.02, 0.03, 0.04], np.float32),
        "wz": np.zeros(4, np.int8),
        "bias": RNG.integers(-500, 500, 4).astype(np.int32),
    }
    init = [onnx.numpy_helper.from_array(v, k) for k, v in scalars.items()]
    nodes = [
        helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["mi"]),
        helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["qm"]),
        helper.make_node(
            "ConvInteger", ["x", "w", "az"], ["ci"], pads=[1, 0, 1, 2], strides=[2, 1]
        ),
        helper.make_node(
            "QLinearConv",
            ["x", "as", "az", "w", "ws", "wz", "ys", "yz", "bias"],
            ["qc"],
            auto_pad="SAME_UPPER",
            strides=[2, 2],
        ),
    ]
    model = _model(
        nodes,
        [
            _vi("a", TensorProto.UINT8, [2, 4, 6]),
            _vi("b", TensorProto.INT8, [6, 5]),
            _vi("x", TensorProto.UINT8, [1, 2, 7, 6]),
            _vi("w", TensorProto.INT8, [4, 2, 3, 3]),
        ],
        [
            _vi("mi", TensorProto.INT32, None),
            _vi("qm", TensorProto.UINT8, None),
            _vi("ci", TensorProto.INT32, None),
            _vi("qc", TensorProto.UINT8, None),
        ],
        init,
    )
    feeds = {"a": a, "b": b, "x": x, "w": w}
    _compare(model, feeds, atol=1)
