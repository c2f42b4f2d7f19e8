"""BatchNorm folding into Conv/ConvTranspose/Gemm and Pad folding into Conv.

Every rule three ways: structure on a tiny graph (ops left, one step per application),
numerics (reference backend on the folded graph against onnxruntime and the reference on the
original), and a near match that must not fire, with its recorded "why not" reason.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load
from engine.passes import optimize
from engine.passes.conv_bn import CONV_BN_PASSES
from engine.passes.manager import PassManager, StepRecorder

RNG = np.random.default_rng(11)
F = TensorProto.FLOAT


def _bn_params(channels: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    return {
        f"{prefix}_scale": RNG.uniform(0.5, 1.5, channels).astype(np.float32),
        f"{prefix}_bias": RNG.standard_normal(channels).astype(np.float32),
        f"{prefix}_mean": RNG.standard_normal(channels).astype(np.float32),
        f"{prefix}_var": RNG.uniform(0.5, 2.0, channels).astype(np.float32),
    }


def _bn(x: str, out: str = "out") -> onnx.NodeProto:
    names = [x, "bn_scale", "bn_bias", "bn_mean", "bn_var"]
    return helper.make_node("BatchNormalization", names, [out], name="bn", epsilon=1e-3)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list],
    initializers: dict[str, np.ndarray],
    outputs: tuple[str, ...] = ("out",),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, F, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, F, None) for n in outputs],
        [numpy_helper.from_array(a, n) for n, a in initializers.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(proto)


def _run(proto: onnx.ModelProto):
    model = load(proto)
    recorder = StepRecorder()
    PassManager(CONV_BN_PASSES, [recorder]).run(model)
    return model, recorder


def _ops(model) -> Counter[str]:
    return Counter(n.op_type for n in model.graph)


def _rules(recorder: StepRecorder) -> Counter[str | None]:
    return Counter(step.rule for step in recorder.steps)


def _check_numerics(proto: onnx.ModelProto, model, feeds: dict[str, np.ndarray]) -> None:
    ours = ReferenceInterpreter(model).run(feeds).outputs
    original = ReferenceInterpreter(load(proto)).run(feeds).outputs
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in proto.graph.output]
    for name, expected in zip(names, session.run(None, feeds), strict=True):
        np.testing.assert_allclose(ours[name], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours[name], original[name], rtol=1e-4, atol=1e-5)


def _reasons(recorder: StepRecorder, rule: str) -> list[str]:
    return [why.reason for why in recorder.why_not.values() if why.rule == rule]


# --------------------------------------------------------------------------- Conv + BN


def _conv_bn(extra_consumer: bool = False, scale_is_input: bool = False) -> onnx.ModelProto:
    params = _bn_params(6)
    inputs: dict[str, list] = {"x": [2, 4, 7, 7]}
    if scale_is_input:
        del params["bn_scale"]
        inputs["bn_scale"] = [6]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], group=2),
        _bn("y"),
    ]
    outputs: tuple[str, ...] = ("out",)
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["y"], ["side"], name="side"))
        outputs = ("out", "side")
    weights = {"w": RNG.standard_normal((6, 2, 3, 3)).astype(np.float32) * 0.3}
    weights["b"] = RNG.standard_normal(6).astype(np.float32)
    return _model(nodes, inputs, {**weights, **params}, outputs)


def test_fold_batchnorm_into_conv() -> None:
    proto = _conv_bn()
    model, recorder = _run(proto)
    assert _ops(model) == Counter({"Conv": 1})
    assert _rules(recorder) == Counter({"fold_batchnorm_into_conv": 1})
    _check_numerics(proto, model, {"x": RNG.standard_normal((2, 4, 7, 7)).astype(np.float32)})


def test_batchnorm_with_graph_input_scale_is_not_folded() -> None:
    proto = _conv_bn(scale_is_input=True)
    model, recorder = _run(proto)
    assert _ops(model) == Counter({"Conv": 1, "BatchNormalization": 1})
    assert _reasons(recorder, "fold_batchnorm_into_conv") == [
        "BatchNorm 'bn' not folded into Conv 'conv': scale is a graph input, not a constant"
    ]


def test_batchnorm_after_shared_conv_output_is_not_folded() -> None:
    proto = _conv_bn(extra_consumer=True)
    model, recorder = _run(proto)
    assert _ops(model)["BatchNormalization"] == 1
    assert _reasons(recorder, "fold_batchnorm_into_conv") == [
        "BatchNorm 'bn' not folded into Conv 'conv': the Conv output 'y' is also used by "
        "Relu 'side'"
    ]


# --------------------------------------------------------------------------- ConvTranspose


def _convt_bn(conv_output_is_graph_output: bool = False) -> onnx.ModelProto:
    nodes = [
        helper.make_node(
            "ConvTranspose",
            ["x", "w"],
            ["y"],
            name="up",
            strides=[2, 2],
            group=2,
            pads=[0, 0, 1, 1],
        ),
        _bn("y"),
    ]
    weights = {"w": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3}
    outputs = ("out", "y") if conv_output_is_graph_output else ("out",)
    return _model(nodes, {"x": [1, 4, 5, 5]}, {**weights, **_bn_params(6)}, outputs)


def test_fold_batchnorm_into_conv_transpose() -> None:
    proto = _convt_bn()
    model, recorder = _run(proto)
    assert _ops(model) == Counter({"ConvTranspose": 1})
    assert _rules(recorder) == Counter({"fold_batchnorm_into_conv_transpose": 1})
    _check_numerics(proto, model, {"x": RNG.standard_normal((1, 4, 5, 5)).astype(np.float32)})


def test_conv_transpose_output_that_is_a_graph_output_keeps_its_batchnorm() -> None:
    model, recorder = _run(_convt_bn(conv_output_is_graph_output=True))
    assert _ops(model)["BatchNormalization"] == 1
    assert _reasons(recorder, "fold_batchnorm_into_conv_transpose") == [
        "BatchNorm 'bn' not folded into ConvTranspose 'up': the ConvTranspose output 'y' is a "
        "graph output"
    ]


# --------------------------------------------------------------------------- Gemm


def _gemm_bn(runtime_mean: bool = False) -> onnx.ModelProto:
    params = _bn_params(4)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=1, beta=0.5)]
    if runtime_mean:
        nodes.append(helper.make_node("ReduceMean", ["x"], ["bn_mean"], name="mean", axes=[0]))
        del params["bn_mean"]
    nodes.append(_bn("y"))
    weights = {
        "w": RNG.standard_normal((4, 4)).astype(np.float32),
        "c": RNG.standard_normal(4).astype(np.float32),
    }
    return _model(nodes, {"x": [3, 4]}, {**weights, **params})


def test_fold_batchnorm_into_gemm() -> None:
    proto = _gemm_bn()
    model, recorder = _run(proto)
    assert _ops(model) == Counter({"Gemm": 1})
    assert _rules(recorder) == Counter({"fold_batchnorm_into_gemm": 1})
    _check_numerics(proto, model, {"x": RNG.standard_normal((3, 4)).astype(np.float32)})


def test_batchnorm_with_runtime_mean_is_not_folded_into_gemm() -> None:
    model, recorder = _run(_gemm_bn(runtime_mean=True))
    assert _ops(model)["BatchNormalization"] == 1
    assert _reasons(recorder, "fold_batchnorm_into_gemm") == [
        "BatchNorm 'bn' not folded into Gemm 'fc': mean 'bn_mean' is computed by "
        "ReduceMean 'mean', not a constant"
    ]


# --------------------------------------------------------------------------- Pad


def _pad_conv(
    mode: str = "constant", value: float = 0.0, pads_input: bool = False
) -> onnx.ModelProto:
    consts: dict[str, np.ndarray] = {
        "w": RNG.standard_normal((3, 2, 3, 3)).astype(np.float32),
        "value": np.array(value, np.float32),
    }
    inputs: dict[str, list] = {"x": [1, 2, 6, 5]}
    if pads_input:
        inputs["pads"] = [8]
    else:
        consts["pads"] = np.array([0, 0, 1, 2, 0, 0, 1, 0], np.int64)
    graph = helper.make_graph(
        [
            helper.make_node("Pad", ["x", "pads", "value"], ["p"], name="pad", mode=mode),
            helper.make_node("Conv", ["p", "w"], ["out"], name="conv", pads=[1, 0, 0, 1]),
        ],
        "g",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64 if n == "pads" else F, s)
            for n, s in inputs.items()
        ],
        [helper.make_tensor_value_info("out", F, None)],
        [numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_pad_into_conv() -> None:
    proto = _pad_conv()
    model, recorder = _run(proto)
    assert _ops(model) == Counter({"Conv": 1})
    assert _rules(recorder) == Counter({"fold_pad_into_conv": 1})
    conv = next(iter(model.graph))
    assert list(conv.attributes["pads"].value) == [2, 2, 1, 1]
    _check_numerics(proto, model, {"x": RNG.standard_normal((1, 2, 6, 5)).astype(np.float32)})


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"mode": "reflect"}, "mode is 'reflect', a Conv only pads with zeros"),
        ({"value": 1.5}, "the pad value is 1.5, a Conv pads with zeros"),
        ({"pads_input": True}, "the pads input is a graph input, not a constant"),
    ],
)
def test_pad_that_is_not_zero_constant_padding_is_not_folded(kwargs: dict, reason: str) -> None:
    model, recorder = _run(_pad_conv(**kwargs))
    assert _ops(model) == Counter({"Pad": 1, "Conv": 1})
    assert _reasons(recorder, "fold_pad_into_conv") == [
        f"Pad 'pad' not folded into Conv 'conv': {reason}"
    ]


def test_folding_through_optimize_records_one_step_per_fold() -> None:
    proto = _conv_bn()
    result = optimize(load(proto), "O2")
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph)
    assert sum(step.rule == "fold_batchnorm_into_conv" for step in result.steps) == 1
    _check_numerics(
        proto, result.model, {"x": RNG.standard_normal((2, 4, 7, 7)).astype(np.float32)}
    )
