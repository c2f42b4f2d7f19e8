"""export_qdq: hand-built engine models (int8 layers, reformats, fp16) exported as QDQ ONNX.

The engine model runs on our reference interpreter (exact int8 kernels); the export runs on
onnxruntime (float ops between DequantizeLinear/QuantizeLinear). They must agree within one
quantization step of the compared tensor on at least 99% of the elements.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy import special

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load, to_proto
from engine.ops.registry import GIE_DOMAIN
from engine.quantize.qdq_export import ExportError, export_qdq

RNG = np.random.default_rng(5)
INT8, FLOAT, FLOAT16 = TensorProto.INT8, TensorProto.FLOAT, TensorProto.FLOAT16


# --------------------------------------------------------------------------- quantization by hand


def _scale(values: np.ndarray) -> np.float32:
    return np.float32(max(float(np.max(np.abs(values))), 1e-8) / 127)


def _quantize(values: np.ndarray, scale: Any) -> np.ndarray:
    scaled = values.astype(np.float32) / np.asarray(scale, np.float32)
    return np.clip(np.rint(scaled), -128, 127).astype(np.int8)


def _weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel int8 weight along ``axis`` and its float32 scales."""
    other = tuple(i for i in range(w.ndim) if i != axis)
    scales = (np.max(np.abs(w), axis=other) / 127).astype(np.float32)
    shape = [-1 if i == axis else 1 for i in range(w.ndim)]
    return _quantize(w, scales.reshape(shape)), scales


def _bias(b: np.ndarray, x_scale: np.float32, w_scales: np.ndarray) -> np.ndarray:
    return np.rint(b.astype(np.float64) / (np.float64(x_scale) * w_scales)).astype(np.int32)


# --------------------------------------------------------------------------- model plumbing


def _meta(node: onnx.NodeProto, **props: str) -> onnx.NodeProto:
    for key, value in props.items():
        node.metadata_props.add(key=f"gie.{key}", value=value)
    return node


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, np.ndarray],
    consts: dict[str, np.ndarray],
    outputs: dict[str, int],
) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "engine",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in inputs.items()
        ],
        [helper.make_tensor_value_info(n, t, None) for n, t in outputs.items()],
        [numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(GIE_DOMAIN, 1)]
    return load(helper.make_model(graph, opset_imports=opsets))


def _run_both(model: ir.Model, feeds: dict[str, np.ndarray]) -> tuple[dict, dict, Any]:
    ours = ReferenceInterpreter(model).run(feeds).outputs
    exported, report = export_qdq(model)
    assert not [n for n in exported.graph if n.domain == GIE_DOMAIN]
    session = ort.InferenceSession(
        to_proto(exported).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    theirs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    return ours, theirs, (exported, report)


def _fraction_within(ours: np.ndarray, theirs: np.ndarray, step: Any) -> float:
    difference = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    return float(np.mean(difference <= 1.01 * np.asarray(step, np.float64)))


def _float_run(nodes: list[onnx.NodeProto], feeds: dict, consts: dict, output: str) -> np.ndarray:
    """A float32 ONNX graph on onnxruntime (to choose activation scales)."""
    graph = helper.make_graph(
        nodes,
        "float",
        [helper.make_tensor_value_info(n, FLOAT, a.shape) for n, a in feeds.items()],
        [helper.make_tensor_value_info(output, FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


# --------------------------------------------------------------------------- QConv


def _conv_engine() -> tuple[ir.Model, dict[str, np.ndarray], dict[str, Any]]:
    """x -> Q (reformat) -> QConv(int8 out, Relu) -> QConv(group 2, residual x, float out)."""
    x = RNG.standard_normal((2, 4, 8, 8)).astype(np.float32)
    w1, b1 = RNG.standard_normal((8, 4, 3, 3)) * 0.3, RNG.standard_normal(8) * 0.1
    w2, b2 = RNG.standard_normal((4, 4, 3, 3)) * 0.3, RNG.standard_normal(4) * 0.1
    conv = {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3], "strides": [1, 1], "dilations": [1, 1]}
    float_nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["y1"]),
    ]
    consts32 = {"w1": w1.astype(np.float32), "b1": b1.astype(np.float32)}
    y1 = _float_run(float_nodes, {"x": x}, consts32, "y1")
    sx, s1 = _scale(x), _scale(y1)
    w1q, w1s = _weight(w1, 0)
    w2q, w2s = _weight(w2, 0)
    consts = {
        "sx": np.array(sx),
        "zp": np.array(0, np.int8),
        "w1q": w1q,
        "w1s": w1s,
        "b1q": _bias(b1, sx, w1s),
        "s1": np.array(s1),
        "w2q": w2q,
        "w2s": w2s,
        "b2q": _bias(b2, s1, w2s),
    }
    nodes = [
        _meta(
            helper.make_node("QuantizeLinear", ["x", "sx", "zp"], ["xq"], "q_x"), role="reformat"
        ),
        _meta(
            helper.make_node(
                "QConv",
                ["xq", "sx", "w1q", "w1s", "b1q", "", "s1"],
                ["y1q"],
                "conv1",
                domain=GIE_DOMAIN,
                group=1,
                activation="Relu",
                output_dtype=INT8,
                **conv,
            ),
            precision="int8",
            provenance='["/conv1/Conv", "/relu1/Relu"]',
        ),
        _meta(
            helper.make_node(
                "QConv",
                ["y1q", "s1", "w2q", "w2s", "b2q", "x"],
                ["out"],
                "conv2",
                domain=GIE_DOMAIN,
                group=2,
                output_dtype=FLOAT,
                **conv,
            ),
            precision="int8",
        ),
    ]
    model = _model(nodes, {"x": x}, consts, {"out": FLOAT})
    # one step of y1q moves an output of channel c by at most s1 * max|w2_c|
    step = (s1 * 127 * w2s).reshape(1, -1, 1, 1)
    return model, {"x": x}, {"step": step}


def test_qconv_chain_matches_within_one_step(record_property: Any) -> None:
    model, feeds, info = _conv_engine()
    ours, theirs, (exported, report) = _run_both(model, feeds)
    fraction = _fraction_within(ours["out"], theirs["out"], info["step"])
    record_property("qconv_fraction_within_one_step", fraction)
    assert fraction >= 0.99, f"only {fraction:.4f} of the outputs within one step"
    assert report.int8_layers == 2
    assert report.qdq_written == 5  # DQ x, DQ w (x2 layers) and Q y1
    assert report.qdq_total == 6  # plus the reformat Q of x
    nodes = {n.name: n for n in exported.graph}
    assert nodes["conv1/quantize_y"].outputs[0].name == "y1q"
    assert nodes["conv1/dequantize_w"].attributes.get_int("axis") == 0
    assert nodes["conv1/conv"].metadata_props["gie.provenance"] == '["/conv1/Conv", "/relu1/Relu"]'
    assert nodes["conv2/residual"].op_type == "Add"
    assert exported.graph.initializers["w1q"].dtype == ir.DataType.INT8
    assert "b1q" not in exported.graph.initializers  # the int32 bias became a float32 one
    assert exported.graph.initializers["conv1/bias"].dtype == ir.DataType.FLOAT


def test_input_untouched_and_non_constant_bias_refused() -> None:
    model, _, _ = _conv_engine()
    before = to_proto(model).SerializeToString()
    export_qdq(model)
    assert to_proto(model).SerializeToString() == before
    conv2 = next(n for n in model.graph if n.name == "conv2")
    conv2.replace_input_with(4, model.graph.inputs[0])
    with pytest.raises(ExportError, match="'conv2'.*bias 'x' is not a constant"):
        export_qdq(model)


# --------------------------------------------------------------------------- QGemm


def test_qgemm_gemm_and_matmul_kinds_match_within_one_step(record_property: Any) -> None:
    """x -> Q -> QGemm(Gemm, transB, GELU, int8 out) -> QGemm(MatMul, float out)."""
    x = RNG.standard_normal((6, 16)).astype(np.float32)
    w1, b1 = RNG.standard_normal((12, 16)) * 0.3, RNG.standard_normal(12) * 0.1  # [N, K]
    w2, b2 = RNG.standard_normal((12, 5)) * 0.3, RNG.standard_normal(5) * 0.1  # [K, N]
    g1 = x @ w1.T.astype(np.float32) + b1.astype(np.float32)
    y1 = 0.5 * g1 * (1 + special.erf(g1 / np.sqrt(2)))  # GELU
    sx, s1 = _scale(x), _scale(y1)
    w1q, w1s = _weight(w1, 0)
    w2q, w2s = _weight(w2, 1)
    consts = {
        "sx": np.array(sx),
        "zp": np.array(0, np.int8),
        "w1q": w1q,
        "w1s": w1s,
        "b1q": _bias(b1, sx, w1s),
        "s1": np.array(s1),
        "w2q": w2q,
        "w2s": w2s,
        "b2q": _bias(b2, s1, w2s),
    }
    nodes = [
        _meta(
            helper.make_node("QuantizeLinear", ["x", "sx", "zp"], ["xq"], "q_x"), role="reformat"
        ),
        helper.make_node(
            "QGemm",
            ["xq", "sx", "w1q", "w1s", "b1q", "", "s1"],
            ["y1q"],
            "fc1",
            domain=GIE_DOMAIN,
            kind="Gemm",
            transB=1,
            activation="GELU",
        ),
        helper.make_node(
            "QGemm",
            ["y1q", "s1", "w2q", "w2s", "b2q"],
            ["out"],
            "fc2",
            domain=GIE_DOMAIN,
            kind="MatMul",
        ),
    ]
    model = _model(nodes, {"x": x}, consts, {"out": FLOAT})
    ours, theirs, (exported, report) = _run_both(model, {"x": x})
    step = s1 * 127 * w2s  # one y1q step, along the output's last axis
    fraction = _fraction_within(ours["out"], theirs["out"], step)
    record_property("qgemm_fraction_within_one_step", fraction)
    assert fraction >= 0.99, f"only {fraction:.4f} of the outputs within one step"
    nodes_by_name = {n.name: n for n in exported.graph}
    assert nodes_by_name["fc1/dequantize_w"].attributes.get_int("axis") == 0  # [N, K]
    assert nodes_by_name["fc2/dequantize_w"].attributes.get_int("axis") == 1  # [K, N]
    assert nodes_by_name["fc1/gemm"].attributes.get_int("transB") == 1
    assert report.int8_layers == 2 and report.qdq_written == 5


# --------------------------------------------------------------------------- QMatMul


def test_qmatmul_int8_and_float_outputs(record_property: Any) -> None:
    """Two activations quantized, multiplied: int8 output (then a DQ reformat) and float."""
    a = RNG.standard_normal((2, 3, 8)).astype(np.float32)
    b = RNG.standard_normal((2, 8, 5)).astype(np.float32)
    sa, sb, sy = _scale(a), _scale(b), _scale(a @ b)
    consts = {"sa": np.array(sa), "sb": np.array(sb), "sy": np.array(sy)}
    consts["zp"] = np.array(0, np.int8)
    reformat = {"role": "reformat"}
    nodes = [
        _meta(helper.make_node("QuantizeLinear", ["a", "sa", "zp"], ["aq"], "q_a"), **reformat),
        _meta(helper.make_node("QuantizeLinear", ["b", "sb", "zp"], ["bq"], "q_b"), **reformat),
        helper.make_node(
            "QMatMul", ["aq", "sa", "bq", "sb", "sy"], ["yq"], "mm_int8", domain=GIE_DOMAIN
        ),
        _meta(helper.make_node("DequantizeLinear", ["yq", "sy", "zp"], ["y"], "dq_y"), **reformat),
        helper.make_node(
            "QMatMul",
            ["aq", "sa", "bq", "sb"],
            ["z"],
            "mm_float",
            domain=GIE_DOMAIN,
            output_dtype=FLOAT,
        ),
    ]
    model = _model(nodes, {"a": a, "b": b}, consts, {"y": FLOAT, "z": FLOAT})
    ours, theirs, (_, report) = _run_both(model, {"a": a, "b": b})
    for name, step in (("y", sy), ("z", sa * sb)):
        fraction = _fraction_within(ours[name], theirs[name], step)
        record_property(f"qmatmul_{name}_fraction_within_one_step", fraction)
        assert fraction >= 0.99, f"{name}: only {fraction:.4f} within one step"
    assert report.int8_layers == 2
    assert report.qdq_written == 5  # 2 DQ per layer, one Q for the int8 output
    assert report.qdq_total == 8  # plus the three reformats


# --------------------------------------------------------------------------- fp16 layers


def test_fp16_layers_become_fp32_and_reformat_casts_go() -> None:
    """QConv(float16 out) -> Add(fp16 bias) -> Relu (fp16 layers) -> Cast reformat -> out."""
    model, feeds, _ = _conv_engine()
    conv2 = next(n for n in model.graph if n.name == "conv2")
    conv2.attributes["output_dtype"] = ir.AttrInt64("output_dtype", FLOAT16)
    conv2.outputs[0].type = ir.TensorType(ir.DataType.FLOAT16)
    half = ir.Value(
        name="shift", const_value=ir.tensor(np.full(4, 0.5, np.float16).reshape(4, 1, 1))
    )
    half.type = ir.TensorType(ir.DataType.FLOAT16)
    model.graph.register_initializer(half)
    add = ir.Node("", "Add", [conv2.outputs[0], half], name="shift_add")
    relu = ir.Node("", "Relu", add.outputs, name="relu16")
    cast = ir.Node("", "Cast", relu.outputs, [ir.AttrInt64("to", FLOAT)], name="to_fp32")
    for node in (add, relu):
        node.metadata_props["gie.precision"] = "fp16"
    cast.metadata_props["gie.role"] = "reformat"
    model.graph.extend([add, relu, cast])
    cast.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    model.graph.outputs[0] = cast.outputs[0]
    cast.outputs[0].name = "result"
    ours, theirs, (exported, report) = _run_both(model, feeds)
    assert report.fp16_layers == 2 and report.casts_removed == 1
    assert not [n for n in exported.graph if n.op_type == "Cast"]
    assert not [v for v in exported.graph.initializers.values() if v.dtype == ir.DataType.FLOAT16]
    assert exported.graph.outputs[0].name == "result"
    assert theirs["result"].dtype == np.float32
    np.testing.assert_allclose(theirs["result"], ours["result"], rtol=2e-3, atol=2e-2)
    assert "2 fp16 layers exported as fp32" in report.summary()
    assert report.to_json()["casts_removed"] == 1
