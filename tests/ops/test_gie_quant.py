"""gie::QConv, gie::QGemm and gie::QMatMul follow the int8 contract exactly.

Oracles written here, independent of engine.quantize: integer convolution by explicit loops and
int64 matmuls for the accumulators, then the contract's float32 rounding step by step; float
outputs are also compared with float64 arithmetic on the dequantized values. onnxruntime's
QLinearConv, QLinearMatMul and MatMulInteger cross-check the int8 results on the same data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load
from engine.ops.registry import (
    GIE_DOMAIN,
    Attrs,
    KernelContext,
    KernelError,
    OpSpec,
    TensorSpec,
    default_registry,
)
from engine.quantize.qparams import int_matmul

RNG = np.random.default_rng(2024)
CTX = KernelContext(opset=21)
INT8, FLOAT, FLOAT16 = 3, 1, 10
NUMPY_OF = {INT8: np.int8, FLOAT: np.float32, FLOAT16: np.float16}


def _op(name: str) -> OpSpec:
    spec = default_registry().lookup(name, GIE_DOMAIN)
    assert spec is not None, f"gie::{name} is not registered"
    return spec


def _run(name: str, inputs: list[Any], attrs: dict[str, Any]) -> np.ndarray:
    return _op(name).kernel(inputs, Attrs(attrs), CTX)[0]


def _int8(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.integers(-128, 128, size=shape, dtype=np.int8)


# --------------------------------------------------------------------------- oracles


def _loop_conv(x: np.ndarray, w: np.ndarray, group: int, strides, pads, dilations) -> np.ndarray:
    """2-D convolution by explicit loops over filters and output pixels, in x's dtype."""
    n, _, h, wd = x.shape
    m, cg, kh, kw = w.shape
    top, left, bottom, right = pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    oh = (h + top + bottom - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wd + left + right - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    y = np.zeros((n, m, oh, ow), dtype=x.dtype)
    per_group = m // group
    for f in range(m):
        channels = xp[:, (f // per_group) * cg : (f // per_group + 1) * cg]
        for i in range(oh):
            for j in range(ow):
                r0, c0 = i * strides[0], j * strides[1]
                patch = channels[
                    :,
                    :,
                    r0 : r0 + dilations[0] * (kh - 1) + 1 : dilations[0],
                    c0 : c0 + dilations[1] * (kw - 1) + 1 : dilations[1],
                ]
                y[:, f, i, j] = (patch * w[f]).sum(axis=(1, 2, 3))
    return y


def _contract(
    acc: np.ndarray,
    x_scale: np.float32,
    w_scale: np.ndarray,
    channel_shape: tuple[int, ...],
    epilogue: dict[str, Any],
    residual: np.ndarray | None,
    y_scale: np.float32 | None,
    out_dtype: int,
) -> np.ndarray:
    """The contract's requantization written out: float32 product of the scales, float32(acc)
    times it, residual and activation in float32, then the output conversion."""
    acc = np.clip(acc, -(2**31), 2**31 - 1)
    combined = np.float32(x_scale) * w_scale.astype(np.float32)
    real = acc.astype(np.float32) * combined.reshape(channel_shape)
    activation = epilogue.get("activation", "")

    def act(v: np.ndarray) -> np.ndarray:
        if activation == "Relu":
            return np.maximum(v, np.float32(0))
        if activation == "Clip":
            return np.minimum(
                np.maximum(v, np.float32(epilogue["min"])), np.float32(epilogue["max"])
            )
        return v

    if residual is None:
        real = act(real)
    elif epilogue.get("residual_before_activation", 1):
        real = act(real + residual.astype(np.float32))
    else:
        real = act(real) + residual.astype(np.float32)
    if out_dtype == INT8:
        return np.clip(np.rint(real / np.float32(y_scale)), -128, 127).astype(np.int8)
    return real.astype(NUMPY_OF[out_dtype])


def _float64_reference(
    acc64: np.ndarray,
    scale64: np.ndarray,
    epilogue: dict[str, Any],
    residual: np.ndarray | None,
) -> np.ndarray:
    """The layer in float64 on dequantized values: acc * x_scale * w_scale, residual, act."""
    real = acc64 * scale64
    activation = epilogue.get("activation", "")

    def act(v: np.ndarray) -> np.ndarray:
        if activation == "Relu":
            return np.maximum(v, 0.0)
        if activation == "Clip":
            return np.clip(v, epilogue["min"], epilogue["max"])
        return v

    if residual is None:
        return act(real)
    if epilogue.get("residual_before_activation", 1):
        return act(real + residual.astype(np.float64))
    return act(real) + residual.astype(np.float64)


def _check_float_output(
    ours: np.ndarray, reference: np.ndarray, product: np.ndarray, out_dtype: int
) -> None:
    """Within a few roundings of the output type: relative to the result and, for the float32
    stages before a residual add, to the product's magnitude."""
    eps = 2.0**-11 if out_dtype == FLOAT16 else 2.0**-23
    bound = 4 * eps * np.abs(reference) + 4 * 2.0**-23 * np.abs(product) + 1e-30
    assert np.all(np.abs(ours.astype(np.float64) - reference) <= bound)


# --------------------------------------------------------------------------- QConv

CONV_CASES = {
    "plain": dict(c=4, m=6, k=3, group=1),
    "bias": dict(c=4, m=6, k=3, group=1, bias=True),
    "depthwise": dict(c=6, m=6, k=3, group=6, bias=True, pads=[1, 1, 1, 1]),
    "grouped": dict(c=6, m=4, k=3, group=2, bias=True),
    "strided_padded_dilated": dict(
        c=3, m=5, k=3, group=1, strides=[2, 1], pads=[1, 2, 0, 1], dilations=[1, 2]
    ),
    "pointwise_strided": dict(c=8, m=4, k=1, group=1, strides=[2, 2], bias=True),
    "relu": dict(c=4, m=6, k=3, group=1, bias=True, activation="Relu"),
    "clip": dict(c=4, m=6, k=3, group=1, activation="Clip", min=-0.5, max=0.75),
    "residual": dict(c=4, m=6, k=3, group=1, bias=True, residual=True, activation="Relu"),
    "residual_after_act": dict(c=4, m=6, k=3, group=1, residual=True, activation="Relu", before=0),
}


def _conv_case(case: dict[str, Any]) -> dict[str, Any]:
    c, m, k, group = case["c"], case["m"], case["k"], case["group"]
    strides = case.get("strides", [1, 1])
    pads = case.get("pads", [0, 0, 0, 0])
    dilations = case.get("dilations", [1, 1])
    x_q = _int8((2, c, 7, 8))
    w_q = _int8((m, c // group, k, k))
    x_scale = np.float32(0.021)
    w_scale = RNG.uniform(0.002, 0.02, size=m).astype(np.float32)
    bias = RNG.integers(-3000, 3000, size=m).astype(np.int32) if case.get("bias") else None
    acc = _loop_conv(x_q.astype(np.int64), w_q.astype(np.int64), group, strides, pads, dilations)
    if bias is not None:
        acc = acc + bias.reshape(1, -1, 1, 1)
    residual = None
    if case.get("residual"):
        residual = RNG.normal(size=acc.shape).astype(np.float32)
    attrs: dict[str, Any] = dict(
        group=group, strides=strides, pads=pads, dilations=dilations, kernel_shape=[k, k]
    )
    epilogue = {key: case[key] for key in ("activation", "min", "max") if key in case}
    if "before" in case:
        epilogue["residual_before_activation"] = case["before"]
    attrs.update(epilogue)
    real = acc * (float(x_scale) * w_scale.astype(np.float64)).reshape(1, -1, 1, 1)
    y_scale = np.float32(np.abs(real).max() / 200)  # some outputs saturate after the epilogue
    return dict(
        x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias, residual=residual,
        y_scale=y_scale, acc=acc, attrs=attrs, epilogue=epilogue,
    )  # fmt: skip


@pytest.mark.parametrize("out_dtype", [INT8, FLOAT, FLOAT16])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_qconv_follows_the_contract(name: str, out_dtype: int) -> None:
    data = _conv_case(CONV_CASES[name])
    attrs = dict(data["attrs"], output_dtype=out_dtype)
    y_scale = data["y_scale"] if out_dtype == INT8 else None
    inputs = [
        data["x_q"], data["x_scale"], data["w_q"], data["w_scale"], data["bias"],
        data["residual"], y_scale,
    ]  # fmt: skip
    ours = _run("QConv", inputs, attrs)
    expected = _contract(
        data["acc"], data["x_scale"], data["w_scale"], (1, -1, 1, 1), data["epilogue"],
        data["residual"], y_scale, out_dtype,
    )  # fmt: skip
    assert ours.dtype == NUMPY_OF[out_dtype] and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)
    if out_dtype != INT8:
        scale64 = (float(data["x_scale"]) * data["w_scale"].astype(np.float64)).reshape(1, -1, 1, 1)
        product = data["acc"].astype(np.float64) * scale64
        reference = _float64_reference(
            data["acc"].astype(np.float64), scale64, data["epilogue"], data["residual"]
        )
        _check_float_output(ours, reference, product, out_dtype)
    elif name in ("plain", "bias"):
        assert np.any(ours == 127) or np.any(ours == -128)  # saturation exercised
    specs = [TensorSpec.of_array(v) if v is not None else None for v in inputs]
    (shape_spec,) = _op("QConv").shape_rule(specs, Attrs(attrs), CTX)
    assert shape_spec == TensorSpec.of_array(ours)


def _model(
    node: onnx.NodeProto, feeds: dict[str, np.ndarray], consts: dict[str, np.ndarray]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in feeds.items()
        ],
        [onnx.ValueInfoProto(name=node.output[0])],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(GIE_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _compare_with_onnxruntime(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Fraction of elements one unit apart; none may be further apart."""
    diff = np.abs(ours.astype(np.int32) - theirs.astype(np.int32))
    assert diff.max() <= 1, f"int8 results differ by {diff.max()}"
    fraction = float(np.mean(diff == 1))
    assert fraction < 0.01, f"{fraction:.2%} of elements are one unit off"
    return fraction


@pytest.mark.parametrize("group", [1, 2, 6])
def test_qconv_matches_onnxruntime_qlinearconv(group: int) -> None:
    x_q, w_q = _int8((2, 6, 9, 9)), _int8((6, 6 // group, 3, 3))
    x_scale = np.float32(0.03)
    w_scale = RNG.uniform(0.002, 0.02, size=6).astype(np.float32)
    bias = RNG.integers(-2000, 2000, size=6).astype(np.int32)
    y_scale = np.float32(0.4)
    attrs = dict(group=group, strides=[1, 1], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    node = helper.make_node(
        "QConv", ["x", "xs", "w", "ws", "b", "", "ys"], ["y"], domain=GIE_DOMAIN,
        output_dtype=INT8, **attrs,
    )  # fmt: skip
    consts = dict(xs=x_scale, w=w_q, ws=w_scale, b=bias, ys=y_scale)
    ours = ReferenceInterpreter(load(_model(node, {"x": x_q}, consts))).run({"x": x_q})
    ours_y = ours.outputs["y"]
    qlinear = helper.make_node(
        "QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"], **attrs
    )
    zeros = dict(xz=np.int8(0), wz=np.zeros(6, np.int8), yz=np.int8(0))
    model = _model(qlinear, {"x": x_q}, {**consts, **zeros})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"x": x_q})[0]
    assert ours_y.dtype == theirs.dtype == np.int8
    _compare_with_onnxruntime(ours_y, theirs)


def test_qconv_refuses_float_input_and_int8_without_scale() -> None:
    data = _conv_case(CONV_CASES["plain"])
    inputs = [data["x_q"].astype(np.float32), data["x_scale"], data["w_q"], data["w_scale"]]
    with pytest.raises(KernelError, match="int8"):
        _run("QConv", inputs, data["attrs"])
    specs = [TensorSpec.of_array(np.asarray(v)) for v in inputs]
    with pytest.raises(KernelError, match="INT8"):
        _op("QConv").shape_rule(specs, Attrs(data["attrs"]), CTX)
    inputs[0] = data["x_q"]
    with pytest.raises(KernelError, match="Y_scale"):
        _run("QConv", inputs, dict(data["attrs"], output_dtype=INT8))
    assert _run("QConv", inputs, data["attrs"]).dtype == np.float32  # default without Y_scale


def test_qconv_cost_counts_conv_flops_and_int8_bytes() -> None:
    data = _conv_case(CONV_CASES["residual"])
    inputs = [
        data["x_q"], data["x_scale"], data["w_q"], data["w_scale"], data["bias"],
        data["residual"], data["y_scale"],
    ]  # fmt: skip
    out = _run("QConv", inputs, data["attrs"])
    ins = [TensorSpec.of_array(np.asarray(v)) for v in inputs]
    cost = _op("QConv").cost(ins, [TensorSpec.of_array(out)], Attrs(data["attrs"]))
    macs = out.size * data["w_q"][0].size
    assert cost.flops == 2 * macs + 3 * out.size  # bias add, residual add, Relu
    expected_read = sum(np.asarray(v).nbytes for v in inputs)
    assert cost.bytes_read == expected_read and cost.bytes_written == out.size  # int8 out
    assert data["x_q"].nbytes == data["x_q"].size  # 1-byte operands


# --------------------------------------------------------------------------- QGemm

GEMM_CASES = {
    "gemm": dict(kind="Gemm", a=(5, 24), b=(24, 7)),
    "gemm_transB": dict(kind="Gemm", a=(5, 24), b=(7, 24), transB=1),
    "gemm_transA_transB": dict(kind="Gemm", a=(24, 5), b=(7, 24), transA=1, transB=1),
    "matmul_batched": dict(kind="MatMul", a=(2, 3, 5, 24), b=(24, 7)),
}


@pytest.mark.parametrize("out_dtype", [INT8, FLOAT, FLOAT16])
@pytest.mark.parametrize("name", list(GEMM_CASES))
def test_qgemm_follows_the_contract(name: str, out_dtype: int) -> None:
    case = GEMM_CASES[name]
    a_q, b_q = _int8(case["a"]), _int8(case["b"])
    a_int, b_int = a_q.astype(np.int64), b_q.astype(np.int64)
    if case.get("transA"):
        a_int = a_int.T
    if case.get("transB"):
        b_int = b_int.T
    n = b_int.shape[1]
    a_scale = np.float32(0.017)
    b_scale = RNG.uniform(0.002, 0.02, size=n).astype(np.float32)
    bias = RNG.integers(-3000, 3000, size=n).astype(np.int32)
    acc = np.matmul(a_int, b_int) + bias
    residual = RNG.normal(size=acc.shape).astype(np.float16)  # fp16 residual, used as float32
    attrs: dict[str, Any] = {k: v for k, v in case.items() if k in ("kind", "transA", "transB")}
    epilogue = {"activation": "Clip", "min": -1.0, "max": 1.5}
    attrs.update(epilogue, output_dtype=out_dtype)
    y_scale = np.float32(0.01) if out_dtype == INT8 else None
    ours = _run("QGemm", [a_q, a_scale, b_q, b_scale, bias, residual, y_scale], attrs)
    expected = _contract(acc, a_scale, b_scale, (-1,), epilogue, residual, y_scale, out_dtype)
    assert ours.dtype == NUMPY_OF[out_dtype]
    np.testing.assert_array_equal(ours, expected)
    if out_dtype != INT8:
        scale64 = float(a_scale) * b_scale.astype(np.float64)
        reference = _float64_reference(acc.astype(np.float64), scale64, epilogue, residual)
        _check_float_output(ours, reference, acc * scale64, out_dtype)
    inputs = [a_q, a_scale, b_q, b_scale, bias, residual, y_scale]
    specs = [TensorSpec.of_array(np.asarray(v)) if v is not None else None for v in inputs]
    assert _op("QGemm").shape_rule(specs, Attrs(attrs), CTX)[0] == TensorSpec.of_array(ours)
    cost = _op("QGemm").cost(specs, [TensorSpec.of_array(ours)], Attrs(attrs))
    assert cost.flops == ours.size * (2 * b_int.shape[0] + 1 + 1 + 2)  # MACs, bias, residual, Clip


def test_qgemm_refuses_alpha_and_mismatched_operands() -> None:
    a_q, b_q = _int8((3, 4)), _int8((4, 5))
    scales = np.full(5, 0.01, np.float32)
    with pytest.raises(KernelError, match="alpha"):
        _run("QGemm", [a_q, np.float32(0.1), b_q, scales], {"alpha": 2.0})
    with pytest.raises(KernelError, match="multiply"):
        _run("QGemm", [a_q, np.float32(0.1), b_q, scales], {"transB": 1})
    with pytest.raises(KernelError, match="int8"):
        _run("QGemm", [a_q.astype(np.int32), np.float32(0.1), b_q, scales], {})


# --------------------------------------------------------------------------- QMatMul


@pytest.mark.parametrize("out_dtype", [INT8, FLOAT, FLOAT16])
def test_qmatmul_batched_attention_shapes(out_dtype: int) -> None:
    q_q, k_t = _int8((2, 4, 8, 16)), _int8((1, 4, 16, 8))  # Q @ K^T with a broadcast batch
    a_scale, b_scale = np.float32(0.05), np.float32(0.03)
    y_scale = np.float32(0.6) if out_dtype == INT8 else None
    ours = _run("QMatMul", [q_q, a_scale, k_t, b_scale, y_scale], {"output_dtype": out_dtype})
    acc = np.matmul(q_q.astype(np.int64), k_t.astype(np.int64))
    expected = _contract(acc, a_scale, np.asarray(b_scale), (), {}, None, y_scale, out_dtype)
    assert ours.shape == (2, 4, 8, 8) and ours.dtype == NUMPY_OF[out_dtype]
    np.testing.assert_array_equal(ours, expected)
    inputs = [q_q, a_scale, k_t, b_scale, y_scale]
    specs = [TensorSpec.of_array(np.asarray(v)) if v is not None else None for v in inputs]
    assert _op("QMatMul").shape_rule(specs, Attrs({"output_dtype": out_dtype}), CTX)[0] == (
        TensorSpec.of_array(ours)
    )
    cost = _op("QMatMul").cost(specs, [TensorSpec.of_array(ours)], Attrs({}))
    assert cost.flops == 2 * 16 * ours.size


def test_qmatmul_matches_onnxruntime_qlinearmatmul_and_matmulinteger() -> None:
    a_q, b_q = _int8((2, 3, 12, 40)), _int8((2, 3, 40, 10))
    a_scale, b_scale, y_scale = np.float32(0.04), np.float32(0.02), np.float32(0.9)
    ours = _run("QMatMul", [a_q, a_scale, b_q, b_scale, y_scale], {})
    assert ours.dtype == np.int8  # default output with a Y_scale
    feeds = {"a": a_q, "b": b_q}
    qlinear = helper.make_node(
        "QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"]
    )
    consts = {"as": a_scale, "bs": b_scale, "ys": y_scale}
    consts.update(az=np.int8(0), bz=np.int8(0), yz=np.int8(0))
    model = _model(qlinear, feeds, consts)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    _compare_with_onnxruntime(ours, session.run(None, feeds)[0])
    integer = _model(helper.make_node("MatMulInteger", ["a", "b"], ["y"]), feeds, {})
    session = ort.InferenceSession(integer.SerializeToString(), providers=["CPUExecutionProvider"])
    acc = session.run(None, feeds)[0]
    np.testing.assert_array_equal(int_matmul(a_q, b_q), acc)
