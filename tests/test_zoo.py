"""engine.zoo: every model is valid, runs on onnxruntime, matches the reference backend,
is deterministic, and contains the export patterns it claims."""

from __future__ import annotations

from collections import Counter
from functools import cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine.backends.numpy_ref import ReferenceInterpreter
from engine.onnx_io import load
from engine.zoo import ZOO, build, make_inputs
from engine.zoo.builder import concrete_shape

NAMES = sorted(ZOO)

#: op types each model must contain / must not contain.
REQUIRED: dict[str, set[str]] = {
    name: set(ops.split())
    for name, ops in {
        "resnet": "Conv BatchNormalization Relu MaxPool Add GlobalAveragePool Flatten Gemm",
        "mobilenetv2_block": "Conv BatchNormalization Clip Add GlobalAveragePool Gemm",
        "detector_head": "Conv Sigmoid Resize Concat Reshape Transpose Split Shape Gather",
        "bert_opset13": "Gather Shape Unsqueeze Concat Reshape ReduceMean Sub Pow Sqrt Div Erf "
        "Cast Mul Softmax MatMul Transpose Slice Tanh",
        "bert_opset17": "LayerNormalization Erf Shape Gather Unsqueeze Concat Cast Softmax",
        "vit_block": "Conv Reshape Transpose Expand Concat LayerNormalization Split Squeeze "
        "Softmax Erf Gemm",
        "gpt_block": "Range Gemm Split LayerNormalization Slice Where Softmax Pow Tanh MatMul",
        "unet_block": "Conv Relu MaxPool ConvTranspose Resize Concat",
    }.items()
}
FORBIDDEN: dict[str, set[str]] = {
    "bert_opset13": {"LayerNormalization"},
    "bert_opset17": {"ReduceMean", "Sqrt"},
    "gpt_block": {"Erf"},
    "resnet": {"Constant"},
}
OPSETS = {
    "resnet": 13,
    "mobilenetv2_block": 13,
    "detector_head": 13,
    "bert_opset13": 13,
    "bert_opset17": 17,
    "vit_block": 17,
    "gpt_block": 17,
    "unet_block": 13,
}


@cache
def _model(name: str) -> onnx.ModelProto:
    return build(name, 0)


@cache
def _session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        _model(name).SerializeToString(), providers=["CPUExecutionProvider"]
    )


def _run_ort(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = _session(name)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _histogram(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def _attr(node: onnx.NodeProto, name: str) -> object:
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_zoo_lists_every_model() -> None:
    assert set(ZOO) == set(REQUIRED) == set(OPSETS)
    for name, builder in ZOO.items():
        assert builder.__name__ == f"build_{name}"
        assert builder.__doc__


def test_build_unknown_name() -> None:
    with pytest.raises(KeyError, match="unknown zoo model"):
        build("alexnet")


@pytest.mark.parametrize("name", NAMES)
def test_checker_and_structure(name: str) -> None:
    model = _model(name)
    onnx.checker.check_model(model, full_check=True)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets == {"": OPSETS[name]}
    names = [node.name for node in model.graph.node]
    assert all(n.startswith("/") for n in names), "exporter-style scoped node names"
    assert len(set(names)) == len(names)
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert floats, "weights are float32 initializers"
    first_input = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert first_input.dim_param == "batch"


@pytest.mark.parametrize("name", NAMES)
def test_op_histogram_has_claimed_patterns(name: str) -> None:
    histogram = _histogram(_model(name))
    assert REQUIRED[name] <= set(histogram), REQUIRED[name] - set(histogram)
    assert not FORBIDDEN.get(name, set()) & set(histogram)


def test_specific_patterns() -> None:
    bert13 = _histogram(_model("bert_opset13"))
    assert bert13["ReduceMean"] == 2 * bert13["Sqrt"] == 10  # 5 decomposed LayerNorms
    assert _histogram(_model("bert_opset17"))["LayerNormalization"] == 5
    mobilenet = _model("mobilenetv2_block")
    groups = [_attr(n, "group") for n in mobilenet.graph.node if n.op_type == "Conv"]
    assert sum(g > 1 for g in groups) == 3  # one depthwise Conv per inverted residual
    resnet = _model("resnet")
    assert any("downsample" in n.name for n in resnet.graph.node if n.op_type == "Conv")
    resize_modes = {
        name: {_attr(n, "mode") for n in _model(name).graph.node if n.op_type == "Resize"}
        for name in ("detector_head", "unet_block")
    }
    assert resize_modes == {"detector_head": {b"nearest"}, "unet_block": {b"linear"}}


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_per_seed(name: str) -> None:
    first = build(name, 0).SerializeToString(deterministic=True)
    assert build(name, 0).SerializeToString(deterministic=True) == first
    other = build(name, 1)
    assert other.SerializeToString(deterministic=True) != first
    weights = {t.name: t.raw_data for t in _model(name).graph.initializer}
    changed = [t.name for t in other.graph.initializer if t.raw_data != weights[t.name]]
    assert changed, "a different seed draws different weights"
    assert [n.op_type for n in other.graph.node] == [n.op_type for n in _model(name).graph.node]
    feeds, again = make_inputs(other, 3), make_inputs(other, 3)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)


@pytest.mark.parametrize("name", NAMES)
def test_onnxruntime_runs(name: str) -> None:
    model = _model(name)
    feeds = make_inputs(model, 0)
    for value in model.graph.input:
        if value.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            assert feeds[value.name].dtype == np.int64
    outputs = _run_ort(name, feeds)
    assert list(outputs) == [o.name for o in model.graph.output]
    for value in model.graph.output:
        result = outputs[value.name]
        assert result.shape == concrete_shape(model, value)
        assert np.isfinite(result).all()
        assert 0 < np.abs(result).max() < 1e3, "activations stay in a sane range"


def test_bert_attention_mask_hides_padding() -> None:
    feeds = make_inputs(_model("bert_opset13"), 0)
    padded = feeds["attention_mask"][0] == 0
    assert padded.any() and not padded.all()
    changed = dict(feeds, input_ids=feeds["input_ids"].copy())
    changed["input_ids"][0, padded] = 7
    base, other = _run_ort("bert_opset13", feeds), _run_ort("bert_opset13", changed)
    keep = ~padded
    np.testing.assert_allclose(
        base["last_hidden_state"][0, keep], other["last_hidden_state"][0, keep], atol=1e-5
    )


def test_bert_opsets_agree() -> None:
    feeds = make_inputs(_model("bert_opset13"), 0)
    a, b = _run_ort("bert_opset13", feeds), _run_ort("bert_opset17", feeds)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_gpt_is_causal() -> None:
    feeds = make_inputs(_model("gpt_block"), 0)
    changed = {"input_ids": feeds["input_ids"].copy()}
    changed["input_ids"][0, -1] = (changed["input_ids"][0, -1] + 1) % 512
    base, other = _run_ort("gpt_block", feeds), _run_ort("gpt_block", changed)
    np.testing.assert_allclose(base["logits"][0, :-1], other["logits"][0, :-1], atol=1e-5)
    assert not np.allclose(base["logits"][0, -1], other["logits"][0, -1])


@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_onnxruntime(name: str) -> None:
    model = _model(name)
    feeds = make_inputs(model, 0)
    expected = _run_ort(name, feeds)
    actual = ReferenceInterpreter(load(model)).run(feeds).outputs
    assert set(actual) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(
            np.asarray(actual[key]), value, rtol=1e-4, atol=1e-5, err_msg=f"{name}:{key}"
        )
