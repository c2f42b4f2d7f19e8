"""Epilogue fusion into gie::ConvAct / gie::GemmAct, and the O2 acceptance on CNNs.

Every rule three ways: structure on a tiny graph (fused op counts, one step per application),
numerics (reference backend on the fused graph against onnxruntime and the reference on the
original), and a near match that must not fire, with its recorded "why not" reason. Then the
light ResNet-50 and the zoo CNNs at O2.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine import zoo
from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.examples import light_model_path
from engine.onnx_io import load
from engine.passes import optimize, replay
from engine.passes.epilogue import ACTIVATION_PATTERNS, EPILOGUE_PASSES
from engine.passes.graph_text import canonical_text
from engine.passes.manager import PassManager, StepRecorder
from engine.passes.provenance import provenance

RNG = np.random.default_rng(5)
F = TensorProto.FLOAT

# --------------------------------------------------------------------------- tiny graphs

#: producer -> (input shape, nodes making 'y' from 'x', initializers)
PRODUCERS = {
    "conv": ([1, 4, 6, 6], [("Conv", ["x", "w", "b"], "y", {"pads": [1, 1, 1, 1]})]),
    "gemm": ([3, 5], [("Gemm", ["x", "w", "c"], "y", {"transB": 1, "alpha": 0.5})]),
    "matmul_bias": (
        [2, 3, 5],
        [("MatMul", ["x", "w"], "mm", {}), ("Add", ["mm", "c"], "y", {})],
    ),
    "matmul_bias_swapped": (
        [2, 3, 5],
        [("MatMul", ["x", "w"], "mm", {}), ("Add", ["c", "mm"], "y", {})],
    ),
}


def _consts() -> dict[str, np.ndarray]:
    return {
        "w": (RNG.standard_normal((4, 4, 3, 3)) * 0.2).astype(np.float32),
        "wg": RNG.standard_normal((4, 5)).astype(np.float32),
        "wm": RNG.standard_normal((5, 4)).astype(np.float32),
        "b": RNG.standard_normal(4).astype(np.float32),
        "c": RNG.standard_normal(4).astype(np.float32),
        "lo": np.array(-0.5, np.float32),
        "hi": np.array(0.8, np.float32),
        "k_sqrt2": np.array(np.sqrt(2), np.float32),
        "k_one": np.array(1.0, np.float32),
        "k_half": np.array(0.5, np.float32),
        "k_c": np.array(np.sqrt(2 / np.pi), np.float32),
        "k_cube": np.array(0.044715, np.float32),
        "k_three": np.array(3.0, np.float32),
    }


def _activation(suffix: str, y: str, out: str) -> list[onnx.NodeProto]:
    """ONNX nodes computing activation ``suffix`` of y into out (the root is named 'act')."""
    node = helper.make_node
    single = {
        "relu": "Relu",
        "sigmoid": "Sigmoid",
        "hardswish": "HardSwish",
        "tanh": "Tanh",
        "gelu": "Gelu",
    }
    if suffix in single:
        return [node(single[suffix], [y], [out], name="act")]
    if suffix == "leaky_relu":
        return [node("LeakyRelu", [y], [out], name="act", alpha=0.2)]
    if suffix == "clip":
        return [node("Clip", [y, "lo", "hi"], [out], name="act")]
    if suffix in ("silu", "silu_swapped"):
        operands = [y, "sg"] if suffix == "silu" else ["sg", y]
        return [node("Sigmoid", [y], ["sg"]), node("Mul", operands, [out], name="act")]
    if suffix == "gelu_erf":
        return [
            node("Div", [y, "k_sqrt2"], ["g1"]),
            node("Erf", ["g1"], ["g2"]),
            node("Add", ["g2", "k_one"], ["g3"]),
            node("Mul", [y, "g3"], ["g4"]),
            node("Mul", ["g4", "k_half"], [out], name="act"),
        ]
    assert suffix == "gelu_tanh"
    return [
        node("Mul", ["k_half", y], ["t1"]),
        node("Pow", [y, "k_three"], ["t2"]),
        node("Mul", ["k_cube", "t2"], ["t3"]),
        node("Add", [y, "t3"], ["t4"]),
        node("Mul", ["k_c", "t4"], ["t5"]),
        node("Tanh", ["t5"], ["t6"]),
        node("Add", ["k_one", "t6"], ["t7"]),
        node("Mul", ["t1", "t7"], [out], name="act"),
    ]


def _producer(kind: str) -> tuple[list[int], list[onnx.NodeProto]]:
    shape, specs = PRODUCERS[kind]
    weight = {"conv": "w", "gemm": "wg"}.get(kind, "wm")
    nodes = [
        helper.make_node(op, [weight if i == "w" else i for i in ins], [out], name=out, **attrs)
        for op, ins, out, attrs in specs
    ]
    return shape, nodes


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list],
    outputs: tuple[str, ...] = ("out",),
    consts: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    used = {name for n in nodes for name in n.input}
    initializers = {k: v for k, v in (consts or _consts()).items() if k in used}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, F, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, F, None) for n in outputs],
        [numpy_helper.from_array(a, n) for n, a in initializers.items() if n not in inputs],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return onnx.shape_inference.infer_shapes(proto)


def _run(proto: onnx.ModelProto):
    model = load(proto)
    recorder = StepRecorder()
    PassManager(EPILOGUE_PASSES, [recorder]).run(model)
    return model, recorder


def _ops(model) -> Counter[str]:
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph)


def _rules(recorder: StepRecorder) -> Counter[str | None]:
    return Counter(step.rule for step in recorder.steps)


def _reasons(recorder: StepRecorder, rule: str) -> list[str]:
    return [why.reason for why in recorder.why_not.values() if why.rule == rule]


def _feeds(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    feeds = {}
    for value in proto.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = RNG.standard_normal(dims).astype(np.float32)
    return feeds


def _check_numerics(proto: onnx.ModelProto, model) -> None:
    feeds = _feeds(proto)
    ours = ReferenceInterpreter(model).run(feeds).outputs
    original = ReferenceInterpreter(load(proto)).run(feeds).outputs
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in proto.graph.output]
    for name, expected in zip(names, session.run(None, feeds), strict=True):
        np.testing.assert_allclose(ours[name], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours[name], original[name], rtol=1e-5, atol=1e-6)


def _fused(kind: str) -> str:
    return "gie::ConvAct" if kind == "conv" else "gie::GemmAct"


# --------------------------------------------------------------------------- activation rules


@pytest.mark.parametrize("suffix", list(ACTIVATION_PATTERNS))
@pytest.mark.parametrize("kind", list(PRODUCERS))
def test_activation_fuses_into_producer(kind: str, suffix: str) -> None:
    shape, nodes = _producer(kind)
    proto = _model(nodes + _activation(suffix, "y", "out"), {"x": shape})
    model, recorder = _run(proto)
    assert _ops(model) == Counter({_fused(kind): 1})
    expected = Counter({f"fuse_{kind}_{suffix}": 1})
    if kind == "conv":
        expected["conv_to_conv_act"] = 1
    assert _rules(recorder) == expected
    _check_numerics(proto, model)


@pytest.mark.parametrize("suffix", list(ACTIVATION_PATTERNS))
def test_activation_fuses_into_gemm_act_with_residual(suffix: str) -> None:
    shape, nodes = _producer("gemm")
    nodes.append(helper.make_node("Add", ["r", "y"], ["s"], name="res"))
    proto = _model(nodes + _activation(suffix, "s", "out"), {"x": shape, "r": [3, 4]})
    model, recorder = _run(proto)
    assert _ops(model) == Counter({"gie::GemmAct": 1})
    assert _rules(recorder) == Counter(
        {"fuse_gemm_residual_add_swapped": 1, f"fuse_gemm_act_{suffix}": 1}
    )
    (node,) = model.graph
    assert node.attributes["residual_before_activation"].value == 1
    _check_numerics(proto, model)


@pytest.mark.parametrize("suffix", list(ACTIVATION_PATTERNS))
@pytest.mark.parametrize("kind", list(PRODUCERS))
def test_activation_of_shared_value_is_not_fused(kind: str, suffix: str) -> None:
    shape, nodes = _producer(kind)
    proto = _model(nodes + _activation(suffix, "y", "out"), {"x": shape}, ("out", "y"))
    model, recorder = _run(proto)
    assert _ops(model)[_fused(kind)] == (1 if kind == "conv" else 0)
    reasons = _reasons(recorder, f"fuse_{kind}_{suffix}")
    assert len(reasons) == 1
    assert reasons[0].endswith("output 'y' is a graph output")
    assert "'act' not fused into" in reasons[0]


@pytest.mark.parametrize("suffix", list(ACTIVATION_PATTERNS))
def test_activation_of_shared_gemm_act_output_is_not_fused(suffix: str) -> None:
    shape, nodes = _producer("gemm")
    nodes.append(helper.make_node("Add", ["y", "r"], ["s"], name="res"))
    proto = _model(nodes + _activation(suffix, "s", "out"), {"x": shape, "r": [3, 4]}, ("out", "s"))
    model, recorder = _run(proto)
    assert _ops(model)["gie::GemmAct"] == 1
    (reason,) = _reasons(recorder, f"fuse_gemm_act_{suffix}")
    assert reason.endswith("the GemmAct output 's' is a graph output")
    _check_numerics(proto, model)


def test_activation_of_conv_output_with_another_consumer_is_not_fused() -> None:
    shape, nodes = _producer("conv")
    nodes += _activation("relu", "y", "out")
    nodes.append(helper.make_node("MaxPool", ["y"], ["pooled"], name="pool", kernel_shape=[2, 2]))
    proto = _model(nodes, {"x": shape}, ("out", "pooled"))
    model, recorder = _run(proto)
    assert _ops(model) == Counter({"gie::ConvAct": 1, "Relu": 1, "MaxPool": 1})
    assert _reasons(recorder, "fuse_conv_relu") == [
        "Relu 'act' not fused into ConvAct 'y/ConvAct': the ConvAct output 'y' is also used by "
        "MaxPool 'pool'"
    ]
    _check_numerics(proto, model)


def test_matmul_bias_from_graph_input_is_not_fused() -> None:
    shape, nodes = _producer("matmul_bias")
    proto = _model(nodes + _activation("relu", "y", "out"), {"x": shape, "c": [4]})
    model, recorder = _run(proto)
    assert "gie::GemmAct" not in _ops(model)
    assert _reasons(recorder, "fuse_matmul_bias_relu") == [
        "Relu 'act' not fused into MatMul 'mm': the bias is a graph input, not a constant"
    ]


def test_clip_with_runtime_bound_is_not_fused() -> None:
    shape, nodes = _producer("conv")
    proto = _model(nodes + _activation("clip", "y", "out"), {"x": shape, "hi": []})
    model, recorder = _run(proto)
    assert _ops(model) == Counter({"gie::ConvAct": 1, "Clip": 1})
    assert _reasons(recorder, "fuse_conv_clip") == [
        "Clip 'act' not fused into ConvAct 'y/ConvAct': the max bound is a graph input, "
        "not a constant"
    ]


def test_not_a_gelu_when_constants_differ() -> None:
    shape, nodes = _producer("gemm")
    consts = _consts()
    consts["k_half"] = np.array(0.25, np.float32)
    proto = _model(nodes + _activation("gelu_erf", "y", "out"), {"x": shape}, consts=consts)
    _, recorder = _run(proto)
    (reason,) = _reasons(recorder, "fuse_gemm_gelu_erf")
    assert (
        reason
        == "Mul 'act' not fused into Gemm 'y': constant 'k_half' is not 0.5, so this is not a GELU"
    )


# --------------------------------------------------------------------------- residual rules


@pytest.mark.parametrize("swapped", [False, True])
@pytest.mark.parametrize("add_op", ["Add", "Sum"])
@pytest.mark.parametrize("kind", ["conv", "gemm", "gemm_act"])
def test_residual_fuses(kind: str, add_op: str, swapped: bool) -> None:
    shape, nodes = _producer("gemm" if kind == "gemm_act" else kind)
    out_shape = [1, 4, 6, 6] if kind == "conv" else [3, 4]
    last = "y"
    if kind == "gemm_act":
        nodes += _activation("silu", "y", "ya")
        last = "ya"
    operands = ["r", last] if swapped else [last, "r"]
    nodes.append(helper.make_node(add_op, operands, ["out"], name="res"))
    proto = _model(nodes, {"x": shape, "r": out_shape})
    model, recorder = _run(proto)
    assert _ops(model) == Counter({_fused(kind): 1})
    rule = f"fuse_{kind}_residual_{add_op.lower()}{'_swapped' if swapped else ''}"
    assert _rules(recorder)[rule] == 1
    (node,) = model.graph
    assert node.attributes["residual_before_activation"].value == int(kind != "gemm_act")
    _check_numerics(proto, model)


@pytest.mark.parametrize("swapped", [False, True])
@pytest.mark.parametrize("add_op", ["Add", "Sum"])
@pytest.mark.parametrize("kind", ["conv", "gemm", "gemm_act"])
def test_residual_of_shared_value_is_not_fused(kind: str, add_op: str, swapped: bool) -> None:
    shape, nodes = _producer("gemm" if kind == "gemm_act" else kind)
    out_shape = [1, 4, 6, 6] if kind == "conv" else [3, 4]
    last = "y"
    if kind == "gemm_act":
        nodes += _activation("tanh", "y", "ya")
        last = "ya"
    operands = ["r", last] if swapped else [last, "r"]
    nodes.append(helper.make_node(add_op, operands, ["out"], name="res"))
    proto = _model(nodes, {"x": shape, "r": out_shape}, ("out", last))
    model, recorder = _run(proto)
    assert _ops(model)[add_op] == 1
    rule = f"fuse_{kind}_residual_{add_op.lower()}{'_swapped' if swapped else ''}"
    (reason,) = _reasons(recorder, rule)
    assert reason.startswith(f"{add_op} 'res' not fused into ")
    assert reason.endswith(f"output '{last}' is a graph output")
    _check_numerics(proto, model)


def test_conv_relu_then_residual_keeps_the_order() -> None:
    shape, nodes = _producer("conv")
    nodes += _activation("relu", "y", "ya")
    nodes.append(helper.make_node("Add", ["ya", "r"], ["out"], name="res"))
    proto = _model(nodes, {"x": shape, "r": [1, 4, 6, 6]})
    model, recorder = _run(proto)
    (node,) = model.graph
    assert node.attributes["activation"].value == "Relu"
    assert node.attributes["residual_before_activation"].value == 0
    assert _rules(recorder) == Counter(
        {"conv_to_conv_act": 1, "fuse_conv_relu": 1, "fuse_conv_residual_add": 1}
    )
    _check_numerics(proto, model)


def test_residual_that_grows_the_output_is_not_fused() -> None:
    shape, nodes = _producer("conv")
    nodes.append(helper.make_node("Add", ["y", "r"], ["out"], name="res"))
    proto = _model(nodes, {"x": shape, "r": [2, 4, 6, 6]})
    model, recorder = _run(proto)
    assert _ops(model) == Counter({"gie::ConvAct": 1, "Add": 1})
    assert _reasons(recorder, "fuse_conv_residual_add") == [
        "Add 'res' not fused into ConvAct 'y/ConvAct': the residual 'r' of shape [2, 4, 6, 6] "
        "does not broadcast to [1, 4, 6, 6]"
    ]


# --------------------------------------------------------------------------- Conv lowering


def test_conv_with_auto_pad_is_lowered_with_explicit_pads() -> None:
    node = helper.make_node(
        "Conv", ["x", "w"], ["out"], name="c", auto_pad="SAME_UPPER", strides=[2, 2]
    )
    proto = _model([node], {"x": [1, 4, 7, 6]})
    model, recorder = _run(proto)
    assert _ops(model) == Counter({"gie::ConvAct": 1})
    assert _rules(recorder) == Counter({"conv_to_conv_act": 1})
    (fused,) = model.graph
    assert list(fused.attributes["pads"].value) == [1, 0, 1, 1]  # H: 1+1, W: 0+1
    assert "auto_pad" not in fused.attributes
    _check_numerics(proto, model)


def test_conv_with_auto_pad_and_unknown_spatial_shape_is_not_lowered() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["out"], name="c", auto_pad="SAME_LOWER")
    proto = _model([node], {"x": ["N", 4, "H", "W"]})
    model, recorder = _run(proto)
    assert _ops(model) == Counter({"Conv": 1})
    assert _reasons(recorder, "conv_to_conv_act") == [
        "Conv 'c' not lowered to ConvAct: auto_pad SAME_LOWER needs the spatial input shape, "
        "which is unknown"
    ]


# --------------------------------------------------------------------------- O2 acceptance


def _with_output(proto: onnx.ModelProto, op_type: str) -> onnx.ModelProto:
    """The model with the (only) ``op_type`` node's output added as a graph output."""
    (node,) = [n for n in proto.graph.node if n.op_type == op_type]
    proto.graph.output.append(helper.make_tensor_value_info(node.output[0], F, None))
    return proto


def test_light_resnet50_at_o2() -> None:
    proto = _with_output(onnx.load(light_model_path("resnet50")), "Gemm")  # pre-softmax logits
    model = load(proto)
    result = optimize(model, "O2")
    ops = _ops(result.model)
    assert "BatchNormalization" not in ops and "Conv" not in ops
    assert ops["gie::ConvAct"] == 53
    steps = Counter(step.rule for step in result.steps)
    assert steps["fold_batchnorm_into_conv"] == 53
    assert steps["fuse_conv_relu"] == 49
    assert steps["fuse_conv_residual_sum"] + steps["fuse_conv_residual_sum_swapped"] == 16

    (data,) = [v for v in model.graph.inputs if not v.is_initializer()]
    shape = [int(d) for d in data.shape]
    x = (np.arange(np.prod(shape)) / np.prod(shape)).astype(np.float32).reshape(shape)
    expected = ReferenceInterpreter(model).run({data.name: x}).outputs
    got = ReferenceInterpreter(result.model).run({data.name: x}).outputs
    assert len(expected) == 2
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=name)

    original = {n.name: n for n in model.graph}
    seen: Counter[str] = Counter()
    for node in result.model.graph:
        if node.op_type != "ConvAct":
            continue
        origins = provenance(node)
        kinds = Counter(original[name].op_type for name in origins)
        assert kinds["Conv"] == 1 and kinds["BatchNormalization"] == 1, origins
        conv = next(original[n] for n in origins if original[n].op_type == "Conv")
        bn = next(original[n] for n in origins if original[n].op_type == "BatchNormalization")
        assert bn.inputs[0] is conv.outputs[0]
        has_relu = node.attributes.get_string("activation", "") == "Relu"
        if len(node.inputs) > 3:  # the residual Sum came before the Relu: act(y + r)
            assert has_relu and node.attributes.get_int("residual_before_activation") == 1
        assert kinds["Relu"] == int(has_relu), origins
        seen.update(origins)
    for name, node in original.items():
        if node.op_type in ("Conv", "BatchNormalization", "Relu", "Sum"):
            assert seen[name] == 1, name


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2_block"])
def test_zoo_cnn_fusions_replay(name: str) -> None:
    model = load(zoo.build(name, 0))
    result = optimize(model, "O2")
    assert any(step.rule == "fold_batchnorm_into_conv" for step in result.steps)
    assert canonical_text(replay(model, result.steps, "O2")) == canonical_text(result.model)


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2_block", "detector_head", "unet_block"])
def test_zoo_cnns_keep_their_outputs_at_o2(name: str) -> None:
    proto = zoo.build(name, 0)
    feeds = zoo.make_inputs(proto, 0)
    model = load(proto)
    result = optimize(model, "O2")
    ops = _ops(result.model)
    assert "BatchNormalization" not in ops and "Conv" not in ops
    assert ops["gie::ConvAct"] == sum(n.op_type == "Conv" for n in proto.graph.node)
    expected = ReferenceInterpreter(model).run(feeds).outputs
    got = ReferenceInterpreter(result.model).run(feeds).outputs
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
