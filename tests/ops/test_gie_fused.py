"""gie::ConvAct and gie::GemmAct equal the unfused graphs they replace.

Each case runs a one-node fused model on the reference interpreter and the equivalent unfused
ONNX graph (Conv/Gemm/MatMul + Add + activation) on onnxruntime; shape rules and costs are
checked against the kernels' results and the unfused ops' costs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from engine.backends.numpy_ref.interpreter import ReferenceInterpreter
from engine.onnx_io import load
from engine.ops.gie_fused import ACTIVATIONS
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelContext, TensorSpec, default_registry

RNG = np.random.default_rng(7)


def _graph_model(
    nodes: list[onnx.NodeProto], inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in inputs.items()
        ],
        [onnx.ValueInfoProto(name="out")],
        [numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid(GIE_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _activation_nodes(activation: str, x: str, attrs: dict[str, Any]) -> list[onnx.NodeProto]:
    """Unfused ONNX nodes computing ``activation`` of x into 'act'."""
    simple = {"Relu": "Relu", "Sigmoid": "Sigmoid", "HardSwish": "HardSwish", "Tanh": "Tanh"}
    if activation in simple:
        return [helper.make_node(simple[activation], [x], ["act"])]
    if activation == "":
        return [helper.make_node("Identity", [x], ["act"])]
    if activation == "LeakyRelu":
        return [helper.make_node("LeakyRelu", [x], ["act"], alpha=attrs["activation_alpha"])]
    if activation in ("Clip", "Relu6"):
        return [helper.make_node("Clip", [x, "lo", "hi"], ["act"])]
    if activation == "SiLU":
        return [
            helper.make_node("Sigmoid", [x], ["sig"]),
            helper.make_node("Mul", [x, "sig"], ["act"]),
        ]
    approximate = "tanh" if activation == "GELU_tanh" else "none"
    return [helper.make_node("Gelu", [x], ["act"], approximate=approximate)]


def _epilogue_attrs(activation: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {"activation": activation}
    if activation == "LeakyRelu":
        attrs["activation_alpha"] = 0.2
    if activation == "Clip":
        attrs.update(min=-0.5, max=0.75)
    return attrs


def _check(
    fused: onnx.ModelProto, unfused: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> np.ndarray:
    ours = ReferenceInterpreter(load(fused)).run(feeds).outputs["out"]
    reference = ReferenceInterpreter(load(unfused)).run(feeds).outputs["out"]
    session = ort.InferenceSession(unfused.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = session.run(None, feeds)[0]
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    return ours


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", ["none", "before", "after"])
def test_conv_act_matches_unfused(activation: str, residual: str) -> None:
    x = RNG.standard_normal((2, 4, 7, 6)).astype(np.float32)
    res = RNG.standard_normal((2, 6, 4, 3)).astype(np.float32)
    consts = {
        "w": (RNG.standard_normal((6, 2, 3, 3)) * 0.3).astype(np.float32),
        "b": RNG.standard_normal(6).astype(np.float32),
        "lo": np.array(0.0 if activation == "Relu6" else -0.5, np.float32),
        "hi": np.array(6.0 if activation == "Relu6" else 0.75, np.float32),
    }
    conv = {"group": 2, "strides": [2, 2], "pads": [1, 1, 1, 0], "kernel_shape": [3, 3]}
    attrs = {**conv, **_epilogue_attrs(activation)}
    inputs = ["x", "w", "b"] + (["r"] if residual != "none" else [])
    feeds = {"x": x, **({"r": res} if residual != "none" else {})}
    if residual != "none":
        attrs["residual_before_activation"] = int(residual == "before")
    fused = _graph_model(
        [helper.make_node("ConvAct", inputs, ["out"], domain=GIE_DOMAIN, **attrs)], feeds, consts
    )
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], **conv)]
    if residual == "before":
        nodes.append(helper.make_node("Add", ["y", "r"], ["yr"]))
    nodes += _activation_nodes(activation, "yr" if residual == "before" else "y", attrs)
    final = "act"
    if residual == "after":
        nodes.append(helper.make_node("Add", ["act", "r"], ["acr"]))
        final = "acr"
    nodes.append(helper.make_node("Identity", [final], ["out"]))
    result = _check(fused, _graph_model(nodes, feeds, consts), feeds)
    assert result.shape == (2, 6, 4, 3)


@pytest.mark.parametrize("activation", ["", "Relu", "GELU", "SiLU", "GELU_tanh", "LeakyRelu"])
@pytest.mark.parametrize("kind", ["Gemm", "MatMul"])
def test_gemm_act_matches_unfused(activation: str, kind: str) -> None:
    if kind == "Gemm":
        a = RNG.standard_normal((5, 3)).astype(np.float32)  # transA: (K=5, M=3)
        consts = {"bw": RNG.standard_normal((4, 5)).astype(np.float32)}  # transB: (N, K)
        consts["c"] = RNG.standard_normal(4).astype(np.float32)
        core = {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}
        res = RNG.standard_normal((3, 4)).astype(np.float32)
        nodes = [helper.make_node("Gemm", ["a", "bw", "c"], ["y"], **core)]
    else:
        a = RNG.standard_normal((2, 3, 5)).astype(np.float32)
        consts = {"bw": RNG.standard_normal((5, 4)).astype(np.float32)}
        consts["c"] = RNG.standard_normal(4).astype(np.float32)
        core = {}
        res = RNG.standard_normal((2, 3, 4)).astype(np.float32)
        nodes = [
            helper.make_node("MatMul", ["a", "bw"], ["mm"]),
            helper.make_node("Add", ["mm", "c"], ["y"]),
        ]
    consts.update(lo=np.array(0, np.float32), hi=np.array(6, np.float32))
    attrs = {**core, "kind": kind, **_epilogue_attrs(activation), "residual_before_activation": 0}
    feeds = {"a": a, "r": res}
    fused = _graph_model(
        [helper.make_node("GemmAct", ["a", "bw", "c", "r"], ["out"], domain=GIE_DOMAIN, **attrs)],
        feeds,
        consts,
    )
    nodes += _activation_nodes(activation, "y", attrs)
    nodes += [helper.make_node("Add", ["act", "r"], ["out"])]
    result = _check(fused, _graph_model(nodes, feeds, consts), feeds)
    assert result.shape == res.shape


def test_shape_rules_and_costs() -> None:
    registry = default_registry()
    conv_act = registry.lookup("ConvAct", GIE_DOMAIN)
    conv = registry.lookup("Conv")
    assert conv_act is not None and conv is not None
    ctx = KernelContext(opset=17)
    f32 = ir.DataType.FLOAT
    x = TensorSpec((1, 8, 16, 16), f32)
    w = TensorSpec((4, 8, 3, 3), f32)
    b = TensorSpec((4,), f32)
    attrs = Attrs({"pads": [1, 1, 1, 1], "activation": "Relu"})
    (out,) = conv_act.shape_rule([x, w, b, None], attrs, ctx)
    assert out.shape == (1, 4, 16, 16)
    (conv_out,) = conv.shape_rule([x, w, b], attrs, ctx)
    assert conv_out.shape == out.shape
    # a residual of the output's shape is read, the intermediate is never written
    spec = TensorSpec((1, 4, 16, 16), ir.DataType.FLOAT)
    fused = conv_act.cost([x, w, b, spec], [spec], Attrs({"activation": "Relu"}))
    unfused = conv.cost([x, w, b], [spec], Attrs({}))
    assert fused.flops == unfused.flops + 2 * spec.numel()
    assert fused.bytes_written == spec.nbytes()
    assert fused.bytes_read == unfused.bytes_read + spec.nbytes()
    gemm_act = registry.lookup("GemmAct", GIE_DOMAIN)
    assert gemm_act is not None
    a = TensorSpec(("batch", 7, 5), ir.DataType.FLOAT)
    bw = TensorSpec((5, 3), ir.DataType.FLOAT)
    (mm,) = gemm_act.shape_rule([a, bw, None, None], Attrs({"kind": "MatMul"}), ctx)
    assert mm.shape == ("batch", 7, 3)
    (gm,) = gemm_act.shape_rule([bw, bw], Attrs({"transA": 1}), ctx)
    assert gm.shape == (3, 3)


def test_unknown_activation_is_refused() -> None:
    x = np.ones((1, 1, 3, 3), np.float32)
    node = helper.make_node("ConvAct", ["x", "w"], ["out"], domain=GIE_DOMAIN, activation="Elu")
    model = _graph_model([node], {"x": x}, {"w": np.ones((1, 1, 1, 1), np.float32)})
    with pytest.raises(Exception, match="unknown activation 'Elu'"):
        ReferenceInterpreter(load(model)).run({"x": x})
